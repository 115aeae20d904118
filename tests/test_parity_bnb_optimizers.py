"""Parity with bitsandbytes' 8-bit optimizers (NVIDIA GPU, torch and
bitsandbytes installed; skipped elsewhere).

Same initial parameter, same gradients, five steps each side: the
parameters stay within a few float32 ulps of bitsandbytes' (quantization
rounding differences are rare and move an element by well under 1% of a
step), and the 8-bit states hold the same codes and absmax but for <= 0.1%
of them (an element one code step away, a block whose absmax followed it;
measured on an H200: 1 block of 4051 in Adam's second moment, 0.44% off).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlowbit as lowbit

torch = pytest.importorskip("torch")
bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.gpu

# Our 8-bit blocks run along the last axis (jlowbit._layout), bitsandbytes'
# over the flattened tensor: the same blocks for a 1-D tensor (here with a
# partial last block of 256) and for a last axis that 256 divides.
SHAPES = [(1_037_000,), (1037, 1024)]
STEPS = 5
# name: (jlowbit factory, bitsandbytes factory, bnb state keys to compare
# with jlowbit's moments (codes, absmax) in order)
CASES = {
    "adamw": (lambda: lowbit.adamw_8bit(1e-3, weight_decay=1e-2, impl="triton"),
              lambda p: bnb.optim.AdamW8bit(p, lr=1e-3, weight_decay=1e-2),
              (("state1", "absmax1"), ("state2", "absmax2"))),
    "lion": (lambda: lowbit.lion_8bit(1e-4, weight_decay=1e-2, impl="triton"),
             lambda p: bnb.optim.Lion8bit(p, lr=1e-4, weight_decay=1e-2),
             (("state1", "absmax1"),)),
    # bitsandbytes rounds AdEMAMix's slow EMA to nearest too.
    "ademamix": (lambda: lowbit.ademamix_8bit(1e-3, weight_decay=1e-2,
                                              stochastic_rounding=False,
                                              impl="triton"),
                 lambda p: bnb.optim.AdEMAMix8bit(p, lr=1e-3, weight_decay=1e-2),
                 ()),
}


def _run_jlowbit(factory, p0, grads):
  tx = factory()
  params = jnp.asarray(p0)
  state = tx.init(params)

  @jax.jit
  def step(params, state, grad):
    updates, state = tx.update(grad, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(params, state, jnp.asarray(g))
  return np.asarray(params), state


def _run_bnb(factory, p0, grads):
  param = torch.nn.Parameter(torch.tensor(p0, device="cuda"))
  opt = factory([param])
  for g in grads:
    param.grad = torch.tensor(g, device="cuda")
    opt.step()
  torch.cuda.synchronize()
  state = {k: v.detach().cpu().numpy() for k, v in opt.state[param].items()
           if torch.is_tensor(v)}
  return param.detach().cpu().numpy(), state


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_bitsandbytes(name, shape):
  ours_factory, bnb_factory, state_keys = CASES[name]
  rng = np.random.default_rng(0)
  p0 = (0.02 * rng.standard_normal(shape)).astype(np.float32)
  grads = [(0.01 * rng.standard_normal(shape)).astype(np.float32)
           for _ in range(STEPS)]
  ours, state = _run_jlowbit(ours_factory, p0, grads)
  theirs, bnb_state = _run_bnb(bnb_factory, p0, grads)
  moved = np.abs(theirs - p0)
  diff = np.abs(ours - theirs)
  far = diff > 1e-2 * moved.mean()
  assert np.count_nonzero(far) <= 1e-3 * diff.size, (
      f"{np.count_nonzero(far)} elements off by > 1% of a mean step; "
      f"max diff {diff.max():.3g}, mean step {moved.mean():.3g}")
  assert diff.mean() < 1e-3 * moved.mean()
  moments = [getattr(state[0], f) for f in state[0]._fields[1:]]
  for (codes_key, absmax_key), moment in zip(state_keys, moments):
    codes, absmax = np.asarray(moment.codes), np.asarray(moment.absmax)
    same = np.mean(codes.reshape(-1) == bnb_state[codes_key].reshape(-1))
    assert same > 0.999, f"{codes_key}: {100 * (1 - same):.3f}% of codes differ"
    rel = np.abs(absmax.reshape(-1) / bnb_state[absmax_key].reshape(-1) - 1)
    assert np.mean(rel > 1e-5) <= 1e-3 and rel.max() < 0.02, (
        f"{absmax_key}: {np.count_nonzero(rel > 1e-5)} blocks differ, max {rel.max():.3g}")
