"""The GPT-style model of the memory benchmarks, on one device or FSDP over a mesh.

Token embedding (tied with the output layer), ``depth`` pre-norm blocks
(causal attention with 128-wide heads, a 4x GELU MLP), float32 parameters,
bfloat16 compute, each block rematerialized in the backward pass (so
parameters, gradients and optimizer state, not activations, decide what
fits); the blocks' parameters are stacked along a leading depth axis and
the forward pass scans over them.

FSDP (:func:`fsdp_specs`, :func:`fsdp_loss`): every matrix is sharded over
the mesh axis ``"fsdp"`` along its largest axis that divides (never the
stacked depth axis the scan runs over, nor the last axis, along which the
blocks of 8-bit optimizer state run: ``jlowbit._layout``); the vectors
(norm scales) are replicated. The batch is sharded over the same axis. The
loss is a ``jax.shard_map``: each device gathers a matrix in bfloat16
(``all_gather``) where it is used, layer by layer inside the scan (again in
the rematerialized backward pass), and the gradients come back
reduce-scattered to the parameters' shards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

FSDP = "fsdp"  # the mesh axis FSDP shards over

Weight = Callable[[str, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Shape:
  width: int
  depth: int
  vocab: int
  heads: int

  @property
  def params(self) -> int:
    return self.vocab * self.width + self.depth * (12 * self.width ** 2
                                                   + 2 * self.width) + self.width


def init_params(shape: Shape, key: jax.Array, specs: dict | None = None) -> dict:
  """float32 parameters; block parameters stacked along a leading depth axis.

  ``specs``: per matrix its ``PartitionSpec`` on the current mesh
  (:func:`fsdp_specs`), generated in place shard by shard; the values do
  not depend on it.
  """
  d, l = shape.width, shape.depth
  keys = jax.random.split(key, 5)
  specs = specs or {}
  blocks = specs.get("blocks", {})

  def normal(k, s, fan_in, spec):
    return jax.random.normal(k, s, jnp.float32, out_sharding=spec) / fan_in ** 0.5

  return {
      "embed": normal(keys[0], (shape.vocab, d), d, specs.get("embed")),
      "blocks": {
          "norm1": jnp.ones((l, d), jnp.float32),
          "qkv": normal(keys[1], (l, d, 3 * d), d, blocks.get("qkv")),
          "out": normal(keys[2], (l, d, d), d, blocks.get("out")),
          "norm2": jnp.ones((l, d), jnp.float32),
          "up": normal(keys[3], (l, d, 4 * d), d, blocks.get("up")),
          "down": normal(keys[4], (l, 4 * d, d), 4 * d, blocks.get("down")),
      },
      "norm": jnp.ones((d,), jnp.float32),
  }


def _rms_norm(x, scale):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-6)
  return (x32 * scale).astype(jnp.bfloat16)


def _bf16(name: str, w: jax.Array) -> jax.Array:
  del name
  return w.astype(jnp.bfloat16)


def loss_fn(params: dict, tokens: jax.Array, heads: int,
            weight: Weight = _bf16) -> jax.Array:
  """Next-token cross-entropy of a batch of ``tokens`` ``[B, T]``.

  ``weight(name, w)``: matrix ``name`` (``"embed"``, or a block's
  ``"qkv"``, ``"out"``, ``"up"``, ``"down"`` without its depth axis) as the
  matmuls use it: cast to bfloat16 (FSDP: and gathered).
  """
  embed = weight("embed", params["embed"])
  x = embed[tokens]
  b, t, d = x.shape

  @jax.checkpoint
  def block(x, p):
    q, k, v = jnp.split(_rms_norm(x, p["norm1"]) @ weight("qkv", p["qkv"]), 3,
                        axis=-1)
    q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
    attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + attn.reshape(b, t, d) @ weight("out", p["out"])
    h = jax.nn.gelu(_rms_norm(x, p["norm2"]) @ weight("up", p["up"]))
    return x + h @ weight("down", p["down"]), None

  x, _ = jax.lax.scan(block, x, params["blocks"])
  logits = (_rms_norm(x, params["norm"]) @ embed.T).astype(jnp.float32)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits[:, :-1], tokens[:, 1:]).mean()


def _matrix_spec(shape: tuple[int, ...], first: int, devices: int) -> P:
  """``P`` sharding the largest of the axes ``first .. ndim - 2`` that
  ``devices`` divides over :data:`FSDP`; replicated if none does."""
  axes = [a for a in range(first, len(shape) - 1) if shape[a] % devices == 0]
  if not axes:
    return P()
  axis = max(axes, key=lambda a: shape[a])
  return P(*(FSDP if a == axis else None for a in range(len(shape))))


def fsdp_specs(shape: Shape, devices: int) -> dict:
  """The parameters' ``PartitionSpec``s for FSDP over ``devices`` devices
  (the tree of :func:`init_params`)."""
  abstract = jax.eval_shape(lambda: init_params(shape, jax.random.key(0)))
  return {
      "embed": _matrix_spec(abstract["embed"].shape, 0, devices),
      "blocks": {k: _matrix_spec(v.shape, 1, devices) if v.ndim >= 3 else P()
                 for k, v in abstract["blocks"].items()},
      "norm": P(),
  }


def _gathered_axis(spec: P, skip: int) -> int | None:
  """The axis ``spec`` shards over :data:`FSDP`, less ``skip`` leading axes
  (the depth axis a scan removes)."""
  entries = tuple(spec)
  return entries.index(FSDP) - skip if FSDP in entries else None


def fsdp_loss(mesh, specs: dict, heads: int) -> Callable:
  """:func:`loss_fn` FSDP over ``mesh``'s :data:`FSDP` axis: ``loss(params,
  tokens)`` with ``params`` sharded by ``specs`` and ``tokens`` by batch;
  the mean over the whole batch."""
  axes = {"embed": _gathered_axis(specs["embed"], 0)}
  axes.update({k: _gathered_axis(s, 1) for k, s in specs["blocks"].items()})

  def weight(name, w):
    w = w.astype(jnp.bfloat16)
    if axes[name] is None:
      return w
    return jax.lax.all_gather(w, FSDP, axis=axes[name], tiled=True)

  def local(params, tokens):
    return jax.lax.pmean(loss_fn(params, tokens, heads, weight), FSDP)

  return jax.shard_map(local, mesh=mesh, in_specs=(specs, P(FSDP)),
                       out_specs=P())
