"""One launcher for every kernel: ``jax_triton.triton_call`` or the interpreter.

``launch(module, kernel_name, *args, out_shape=..., grid=..., impl=...)``
calls ``module.kernel_name`` with the array and scalar ``args`` followed by one
pointer per output, and the keyword arguments as ``tl.constexpr`` values, the
calling convention of ``jax_triton.triton_call``. A generated kernel is named
by its factory: ``kernel_args=(...)`` makes the kernel
``module.kernel_name(*kernel_args)``.

With ``impl="interpret"`` the kernel runs in a helper process that imported
Triton with ``TRITON_INTERPRET=1``, on numpy buffers sent from
``jax.pure_callback``; unaliased outputs start filled with a poison pattern so
that tests catch elements a kernel forgets to write.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import functools
import importlib
import multiprocessing
import os
from collections.abc import Sequence
import jax
import numpy as np

_POISON_BYTE = 0xA5


class _HostStorage:
  """Storage view Triton's interpreter copies to and from."""

  def __init__(self, array: np.ndarray):
    self.array = array

  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def cpu(self) -> "_HostStorage":
    return self

  def copy_(self, other: "_HostStorage") -> None:
    if other.array is not self.array:
      self.array[...] = other.array


class HostTensor:
  """The few torch.Tensor methods Triton's interpreter uses, over numpy."""

  def __init__(self, array: np.ndarray):
    self.array = np.ascontiguousarray(array)
    self.dtype = "torch." + str(self.array.dtype)

  def data_ptr(self) -> int:
    return self.array.ctypes.data

  def untyped_storage(self) -> _HostStorage:
    return _HostStorage(self.array)

  def new_empty(self, *unused_args, **unused_kwargs) -> "HostTensor":
    return HostTensor(self.array)

  def set_(self, storage: _HostStorage, *unused_args) -> "HostTensor":
    self.array = storage.array
    return self

  def storage_offset(self) -> int:
    return 0

  def size(self) -> tuple[int, ...]:
    return self.array.shape

  def stride(self) -> tuple[int, ...]:
    return tuple(s // self.array.itemsize for s in self.array.strides)

  def copy_(self, other: "HostTensor") -> None:
    self.array[...] = other.array


def _init_interpreter_worker() -> None:
  os.environ["TRITON_INTERPRET"] = "1"


@functools.cache
def _interpreter_pool() -> concurrent.futures.ProcessPoolExecutor:
  """One worker process whose Triton was imported with TRITON_INTERPRET=1.

  Triton decides at decoration time whether a ``@triton.jit`` function
  (its own ``tl.zeros`` and friends included) is compiled or interpreted, so
  interpreted kernels live in a process of their own.
  """
  pool = concurrent.futures.ProcessPoolExecutor(
      max_workers=1, mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_interpreter_worker)
  atexit.register(pool.shutdown)
  return pool


def _poisoned(shape: Sequence[int], dtype) -> np.ndarray:
  out = np.empty(shape, dtype)
  out.reshape(-1).view(np.uint8)[...] = _POISON_BYTE
  return out


def _kernel(module_name: str, kernel_name: str, kernel_args: tuple | None):
  """``module.kernel_name``, or the kernel its factory makes of ``kernel_args``."""
  found = getattr(importlib.import_module(module_name), kernel_name)
  return found if kernel_args is None else found(*kernel_args)


def _run_interpreted(module_name, kernel_name, kernel_args, args, arrays,
                     out_shapes, grid, input_output_aliases, constexprs):
  """Runs in the worker: the interpreted kernel over numpy buffers."""
  kernel = _kernel(module_name, kernel_name, kernel_args)
  outs = [_poisoned(shape, dtype) for shape, dtype in out_shapes]
  for array_index, out_index in input_output_aliases.items():
    outs[out_index][...] = arrays[array_index]
  arrays = iter(arrays)
  call_args = [a if _is_scalar(a) else HostTensor(next(arrays)) for a in args]
  kernel[grid](*call_args, *[HostTensor(o) for o in outs], **constexprs)
  return tuple(outs)


def _interpret_call(module_name: str, kernel_name: str, kernel_args, args,
                    out_shapes, grid, input_output_aliases, constexprs):
  array_args = [a for a in args if not _is_scalar(a)]
  scalar_args = [a if _is_scalar(a) else None for a in args]
  shapes = [(tuple(s.shape), np.dtype(s.dtype)) for s in out_shapes]

  def host(*arrays):
    future = _interpreter_pool().submit(
        _run_interpreted, module_name, kernel_name, kernel_args, scalar_args,
        [np.asarray(a) for a in arrays], shapes, grid, input_output_aliases,
        constexprs)
    return future.result()

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
  kernel = _kernel(module_name, kernel_name, kernel_args)
  return tuple(jax_triton.triton_call(
      *args, kernel=kernel, out_shape=out_shape, grid=grid,
      num_warps=num_warps, num_stages=num_stages,
      input_output_aliases=aliases, **constexprs))


def cdiv(a: int, b: int) -> int:
  return -(-a // b)

