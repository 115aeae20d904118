"""Choice of implementation (``impl``) for every kernel-backed op.

``impl`` is one of:

* ``"triton"``: the Triton kernel launched through ``jax_triton.triton_call``
  (NVIDIA GPU only);
* ``"xla"``: the pure ``jax.numpy`` reference with identical math (anywhere);
* ``"interpret"``: the same Triton kernel run by Triton's interpreter on the
  host through ``jax.pure_callback`` (CPU; slow; for tests and debugging).

``None`` means: the ``JLOWBIT_IMPL`` environment variable if set, else
``"triton"`` when the default JAX backend is a CUDA GPU and Triton +
jax-triton import, else ``"xla"``.
"""

import functools
import importlib.util
import os

import jax

IMPLS = ("triton", "xla", "interpret")
ENV_VAR = "JLOWBIT_IMPL"


@functools.cache
def triton_importable() -> bool:
  """Whether the ``triton`` package can be imported (needed by interpret)."""
  return importlib.util.find_spec("triton") is not None


@functools.cache
def jax_triton_usable() -> bool:
  """Whether ``jax_triton`` imports (it needs a CUDA-enabled jaxlib)."""
  if not triton_importable():
    return False
  try:
    import jax_triton  # noqa: F401
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def _on_cuda() -> bool:
  """Whether JAX's default backend is an NVIDIA (CUDA) GPU."""
  if jax.default_backend() != "gpu":
    return False
  version = getattr(jax.devices()[0].client, "platform_version", "")
  return "cuda" in version.lower()


def auto_impl() -> str:
  """The implementation ``impl=None`` resolves to without ``JLOWBIT_IMPL``."""
  return "triton" if _on_cuda() and jax_triton_usable() else "xla"


def resolve_impl(impl: str | None) -> str:
  """Returns the concrete implementation name for an ``impl`` argument.

  Raises:
    ValueError: ``impl`` (or ``JLOWBIT_IMPL``) is not a known name.
    RuntimeError: the requested implementation cannot run here.
  """
  source = "impl"
  if impl is None:
    impl = os.environ.get(ENV_VAR) or None
    source = ENV_VAR
  if impl is None or impl == "auto":
    return auto_impl()
  if impl not in IMPLS:
    raise ValueError(
        f"{source}={impl!r} is not supported; allowed values are None, 'auto', "
        + ", ".join(repr(i) for i in IMPLS))
  if impl == "triton" and not jax_triton_usable():
    raise RuntimeError(
        "impl='triton' needs an NVIDIA GPU, triton and jax-triton with a "
        "CUDA-enabled jaxlib; use impl='xla' (pure jax.numpy) or "
        "impl='interpret' (Triton interpreter on the host) instead.")
  if impl == "interpret" and not triton_importable():
    raise RuntimeError(
        "impl='interpret' needs the triton package (pip install triton); "
        "use impl='xla' instead.")
  return impl
