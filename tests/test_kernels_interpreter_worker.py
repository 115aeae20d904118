"""The worker process behind ``impl="interpret"``.

Interpreted kernels run in a worker process
(:mod:`jlowbit.triton_kernels.launch`). It must start from every entry point
(a script without a main guard, stdin, ``python -c``, code exec'd the way a
notebook runs a cell), leave stdout to the caller, hand kernel errors back,
serve several threads, and be replaced after it dies.
"""

import concurrent.futures
import os
import pathlib
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlowbit
from jlowbit.triton_kernels import launch

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = """\
import jax.numpy as jnp
import numpy as np
import jlowbit

x = jnp.asarray(np.random.default_rng(0).standard_normal(3000), jnp.float32)
got = jlowbit.quantize_blockwise(x, block_size=256, impl="interpret")
want = jlowbit.quantize_blockwise(x, block_size=256, impl="xla")
np.testing.assert_array_equal(got.codes, want.codes)
np.testing.assert_array_equal(got.absmax, want.absmax)
print("interpret == xla")
"""


def _entry_point(kind: str, script: pathlib.Path) -> tuple[list[str], str | None]:
  """Python's arguments and stdin that run ``script`` the way ``kind`` does."""
  if kind == "script":
    return [str(script)], None
  if kind == "stdin":
    return ["-"], SCRIPT
  if kind == "dash_c":
    return ["-c", SCRIPT], None
  assert kind == "exec"  # a notebook cell: code exec'd in a running __main__
  return ["-c", f"exec(open({str(script)!r}).read())"], None


def _run_python(args: list[str], stdin: str | None, cwd: pathlib.Path):
  """Runs this interpreter on ``args`` with this checkout's jlowbit."""
  path = os.environ.get("PYTHONPATH")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO)] + ([path] if path else [])))
  return subprocess.run([sys.executable, *args], input=stdin, env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=300,
                        check=False)


@pytest.mark.parametrize("kind", ["script", "stdin", "dash_c", "exec"])
def test_interpret_runs_from_every_entry_point(kind, tmp_path):
  script = tmp_path / "no_main_guard.py"
  script.write_text(SCRIPT)
  result = _run_python(*_entry_point(kind, script), tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout == "interpret == xla\n", result.stderr


def test_worker_prints_go_to_stderr(tmp_path):
  # A kernel "factory" that prints: builtins.print("...") runs in the worker,
  # whose launch then fails on the None it returns.
  noisy = """\
import jax, jax.numpy as jnp
from jlowbit.triton_kernels import launch

try:
  launch.launch("builtins", "print", jnp.ones(4), kernel_args=("worker noise",),
                out_shape=[jax.ShapeDtypeStruct((4,), jnp.float32)], grid=(1,),
                impl="interpret")
except Exception as e:
  assert "not subscriptable" in str(e), e
"""
  result = _run_python(["-c", noisy + SCRIPT], None, tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout == "interpret == xla\n", result.stderr
  assert "worker noise" in result.stderr


def _quantize_matches_xla():
  x = jnp.linspace(-3.0, 5.0, 3000, dtype=jnp.float32)
  got = jlowbit.quantize_blockwise(x, block_size=256, impl="interpret")
  want = jlowbit.quantize_blockwise(x, block_size=256, impl="xla")
  np.testing.assert_array_equal(got.codes, want.codes)
  np.testing.assert_array_equal(got.absmax, want.absmax)


def test_killed_worker_fails_the_next_call_then_is_replaced():
  _quantize_matches_xla()
  killed = launch._worker.process.pid
  os.kill(killed, signal.SIGKILL)
  with pytest.raises(Exception,
                     match="interpreter worker .* was killed by signal 9"):
    _quantize_matches_xla()
  _quantize_matches_xla()
  assert launch._worker.process.pid != killed


def _dequantize_with(**constexprs):
  codes = jnp.zeros((256,), jnp.uint8)
  return launch.launch(
      "jlowbit.triton_kernels.blockwise8", "dequantize_blockwise_kernel",
      codes, jlowbit.codebooks.dynamic(True), jnp.ones((1,), jnp.float32), 256,
      out_shape=[jax.ShapeDtypeStruct((256,), jnp.float32)], grid=(1,),
      impl="interpret", **constexprs)


def test_kernel_error_reaches_the_caller_with_the_worker_traceback():
  # arange over 3 * 100 elements: Triton wants a power of 2.
  with pytest.raises(Exception, match="power of 2"):
    jax.block_until_ready(_dequantize_with(BLOCK_SIZE=100, BLOCKS=3))
  # pure_callback keeps only the message; the exception the callback raised
  # carries the worker's traceback as a note.
  with pytest.raises(Exception, match="power of 2") as raised:
    launch._run_interpreted(
        "jlowbit.triton_kernels.blockwise8", "dequantize_blockwise_kernel",
        None, [None, None, None, 256],
        [np.zeros(256, np.uint8), np.asarray(jlowbit.codebooks.dynamic(True)),
         np.ones(1, np.float32)],
        [((256,), np.dtype(np.float32))], (1,), {},
        {"BLOCK_SIZE": 100, "BLOCKS": 3})
  notes = "\n".join(getattr(raised.value, "__notes__", []))
  assert "Traceback" in notes and "dequantize_blockwise_kernel" in notes
  # The worker survives a kernel error.
  (out,) = _dequantize_with(BLOCK_SIZE=256, BLOCKS=16)
  np.testing.assert_array_equal(
      out, np.full(256, jlowbit.codebooks.dynamic(True)[0]))


def test_concurrent_calls_get_their_own_outputs():
  rng = np.random.default_rng(1)
  xs = [jnp.asarray(rng.standard_normal(2048) * (i + 1), jnp.float32)
        for i in range(6)]
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    got = list(pool.map(
        lambda x: jlowbit.quantize_blockwise(x, block_size=256, impl="interpret"),
        xs))
  for x, q in zip(xs, got):
    want = jlowbit.quantize_blockwise(x, block_size=256, impl="xla")
    np.testing.assert_array_equal(q.codes, want.codes)
    np.testing.assert_array_equal(q.absmax, want.absmax)
