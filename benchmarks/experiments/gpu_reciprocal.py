"""Is XLA's float32 ``1 / a`` on the GPU correctly rounded? (It decides
whether the ``impl="xla"`` 4-bit quantizer can reproduce bitsandbytes'
``x * (1 / absmax)`` bit for bit on a GPU.) Prints the share of mismatches
against numpy's IEEE division for random positive floats over the exponent
range, for ``1 / a`` and for ``x * (1 / a)``."""

import jax
import jax.numpy as jnp
import numpy as np

rng = np.random.default_rng(0)
a = (rng.uniform(1, 2, 1 << 22) * 2.0 ** rng.integers(-60, 60, 1 << 22)).astype(np.float32)
x = rng.uniform(-1, 1, a.size).astype(np.float32) * a
want_r = np.float32(1) / a
got_r = np.asarray(jax.jit(lambda a: jnp.float32(1) / a)(jnp.asarray(a)))
want_y = x * want_r
got_y = np.asarray(jax.jit(lambda x, a: x * (jnp.float32(1) / a))(jnp.asarray(x), jnp.asarray(a)))
print(jax.devices()[0].device_kind,
      f"1/a mismatches: {np.mean(got_r != want_r):.2e}",
      f"x*(1/a) mismatches: {np.mean(got_y != want_y):.2e}")
