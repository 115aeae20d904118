"""Triton kernels (``@triton.jit``) and their launchers.

Every module here imports ``triton`` at import time; import them only when
``impl`` is ``"triton"`` or ``"interpret"`` (the ops in :mod:`jlowbit` do).
:func:`launch.launch` runs a kernel either through ``jax_triton.triton_call``
(GPU) or through Triton's interpreter on the host (``jax.pure_callback``).
"""
