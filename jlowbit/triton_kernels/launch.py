"""One launcher for every kernel: ``jax_triton.triton_call`` or the interpreter.

``launch(module, kernel_name, *args, out_shape=..., grid=..., impl=...)``
calls ``module.kernel_name`` with the array and scalar ``args`` followed by one
pointer per output, and the keyword arguments as ``tl.constexpr`` values, the
calling convention of ``jax_triton.triton_call``. A generated kernel is named
by its factory: ``kernel_args=(...)`` makes the kernel
``module.kernel_name(*kernel_args)``.

With ``impl="interpret"`` the kernel runs in a worker process that imported
Triton with ``TRITON_INTERPRET=1``
(:mod:`jlowbit.triton_kernels.interpreter_worker`), on numpy buffers sent from
``jax.pure_callback``; unaliased outputs start filled with a poison pattern so
that tests catch elements a kernel forgets to write. The worker is a fresh
``python -c`` that finds modules on this process's ``sys.path`` and never
imports ``__main__``, so scripts without a main guard, stdin and notebooks
work alike. It starts on first use, serves one request at a time, stops at
exit, and is replaced after it dies.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence

import jax
import numpy as np

from jlowbit.triton_kernels import interpreter_worker


class _Worker:
  """A worker process whose Triton was imported with TRITON_INTERPRET=1.

  Triton decides at decoration time whether a ``@triton.jit`` function
  (its own ``tl.zeros`` and friends included) is compiled or interpreted, so
  interpreted kernels live in a process of their own.
  """

  def __init__(self):
    # The worker computes on numpy buffers: JAX there stays on the CPU and
    # never takes GPU memory.
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(sys.path))
    self.process = subprocess.Popen(
        [sys.executable, "-c", interpreter_worker.MAIN],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)

  def call(self, request: bytes) -> bytes:
    interpreter_worker.write_message(self.process.stdin, request)
    return interpreter_worker.read_message(self.process.stdout)

  def stop(self, timeout: float) -> str:
    """Closes its stdin, kills it after ``timeout`` seconds; how it ended."""
    with contextlib.suppress(OSError):  # a dead worker's pipe is broken
      self.process.stdin.close()
    try:
      self.process.wait(timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
    self.process.stdout.close()
    status = self.process.wait()
    if status < 0:
      return f"was killed by signal {-status} ({signal.strsignal(-status)})"
    return f"exited with status {status} (see stderr)"


_worker: _Worker | None = None
_worker_lock = threading.Lock()


@atexit.register
def _stop_worker() -> None:
  if _worker is not None:
    _worker.stop(timeout=5)


def _run_interpreted(*request) -> tuple[np.ndarray, ...]:
  """``interpreter_worker.run(*request)`` in the worker; starts it if needed.

  Raises what the kernel raised, with the worker's traceback as a note, or
  ``RuntimeError`` where the worker died (the next call starts a new one).
  """
  global _worker
  message = pickle.dumps(request, pickle.HIGHEST_PROTOCOL)
  with _worker_lock:
    if _worker is None:
      _worker = _Worker()
    worker = _worker
    try:
      reply = worker.call(message)
    except BaseException as failure:
      # Dead, or interrupted halfway through a request: never reused.
      _worker = None
      ended = worker.stop(timeout=1)
      if isinstance(failure, (OSError, EOFError)):
        raise RuntimeError(
            f"the Triton interpreter worker (pid {worker.process.pid}) "
            f"{ended}; the next call starts a new one") from failure
      raise
  succeeded, result = pickle.loads(reply)
  if succeeded:
    return result
  pickled, summary, worker_traceback = result
  try:  # None where it did not pickle; its class may not import here
    error = pickle.loads(pickled)
  except Exception:  # pylint: disable=broad-except
    error = RuntimeError(summary)
  error.add_note("Traceback in the Triton interpreter worker:\n"
                 + worker_traceback)
  raise error


def _interpret_call(module_name: str, kernel_name: str, kernel_args, args,
                    out_shapes, grid, input_output_aliases, constexprs):
  array_args = [a for a in args if not _is_scalar(a)]
  scalar_args = [a if _is_scalar(a) else None for a in args]
  shapes = [(tuple(s.shape), np.dtype(s.dtype)) for s in out_shapes]

  def host(*arrays):
    return _run_interpreted(module_name, kernel_name, kernel_args, scalar_args,
                            [np.asarray(a) for a in arrays], shapes, grid,
                            input_output_aliases, constexprs)

  result_shapes = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for s in out_shapes)
  return jax.pure_callback(host, result_shapes, *array_args,
                           vmap_method="sequential")


def _is_scalar(arg) -> bool:
  return isinstance(arg, (bool, int, float, np.integer, np.floating))


def launch(module_name: str, kernel_name: str, *args,
           out_shape: Sequence[jax.ShapeDtypeStruct],
           grid: tuple[int, ...],
           impl: str,
           kernel_args: tuple | None = None,
           input_output_aliases: dict[int, int] | None = None,
           num_warps: int = 4,
           num_stages: int = 2,
           **constexprs) -> tuple[jax.Array, ...]:
  """Launches ``module_name.kernel_name`` on ``grid``; returns the outputs.

  Args:
    module_name: module holding the ``@triton.jit`` kernel.
    kernel_name: the kernel's name in that module.
    *args: arrays and int scalars, in the kernel's argument order; the output
      pointers follow them.
    out_shape: one ``jax.ShapeDtypeStruct`` per output.
    grid: launch grid (up to 3 ints).
    impl: ``"triton"`` or ``"interpret"``.
    kernel_args: if given, ``module_name.kernel_name`` is a factory (of
      hashable arguments, cached) and the kernel is
      ``module_name.kernel_name(*kernel_args)``.
    input_output_aliases: ``{array-argument index: output index}``; indices
      count array arguments only (scalars are skipped).
    num_warps, num_stages: Triton launch options (ignored when interpreted).
    **constexprs: the kernel's ``tl.constexpr`` arguments.

  Returns:
    A tuple with one array per ``out_shape`` entry.
  """
  out_shape = tuple(out_shape)
  aliases = dict(input_output_aliases or {})
  grid = tuple(int(g) for g in grid)
  if impl == "interpret":
    return tuple(_interpret_call(module_name, kernel_name, kernel_args, args,
                                 out_shape, grid, aliases, constexprs))
  if impl != "triton":
    raise ValueError(f"impl={impl!r}: launch() runs 'triton' or 'interpret'")
  import jax_triton  # pylint: disable=g-import-not-at-top
  kernel = interpreter_worker.find_kernel(module_name, kernel_name, kernel_args)
  return tuple(jax_triton.triton_call(
      *args, kernel=kernel, out_shape=out_shape, grid=grid,
      num_warps=num_warps, num_stages=num_stages,
      input_output_aliases=aliases, **constexprs))


def cdiv(a: int, b: int) -> int:
  return -(-a // b)

