r"""Fused 8-bit optimizer updates: one kernel launch per parameter leaf.

Each kernel reads the gradient ``g`` and the 8-bit moments (uint8 codes +
float32 per-block absmax), dequantizes them (``code[codes] * absmax``), does
the float32 update math of its algorithm, writes the *direction* in the
gradient's dtype and requantizes every new moment blockwise in place
(``absmax`` = max |moment| per block, nearest code, ties to the lower index,
exactly as :func:`jlowbit.blockwise8.quantize_blockwise_reference`).

A program owns ``TILE`` consecutive elements of the flattened leaf, i.e.
``TILE // BLOCKSIZE`` whole quantization blocks, as one flat tile (reshaped to
``[blocks, BLOCKSIZE]`` only for the per-block absmax, so the table gathers
keep a coalesced one-dimensional layout); lanes past the end are masked:
their moments are zeroed before the absmax and never stored. When 16 divides the leaf size the
kernel is told so (``CHUNK``), which lets Triton vectorize every load and store.

Hyperparameters are one float32 vector ``hyper`` the kernel ``tl.load``\ s
(never ``tl.constexpr``: new values never recompile). Layout and math, with
``m, v, ...`` the dequantized old moments and ``g`` the float32 gradient:

========== ================================ ===================================
algorithm  hyper                            update
========== ================================ ===================================
adam       b1, b2, eps, bc1, bc2            m = b1 m + (1-b1) g;
                                            v = b2 v + (1-b2) g g;
                                            d = (m/bc1) / (sqrt(v)/sqrt(bc2) + eps)
ademamix   b1, b2, b3, alpha, eps, bc1, bc2 m1 = b1 m1 + (1-b1) g;
                                            m2 = b3 m2 + (1-b3) g;
                                            nu = b2 nu + (1-b2) g g;
                                            d = (m1/bc1 + alpha m2) /
                                            (sqrt(nu)/sqrt(bc2) + eps)
lion       b1, b2                           d = sign(b1 m + (1-b1) g);
                                            m = b2 m + (1-b2) g
momentum   momentum, first                  m = g if first != 0 else
                                            momentum m + g; d = m
rmsprop    decay, eps                       v = decay v + (1-decay) g g;
                                            d = g / (sqrt(v) + eps)
adagrad    eps                              v = v + g g; d = g / (sqrt(v) + eps)
========== ================================ ===================================

First moments use the signed dynamic codebook, second moments (``v``,
``nu``) the unsigned one. Both reach the kernels in one float32
``[2, 2, 256]`` array ``qmaps`` (``[signed, unsigned] x [codebook, sorted
thresholds]``) and one uint8 array of bucket starts
(:func:`jlowbit._reference.bucket_search_table`): requantization compares
``threshold * absmax <= moment`` like the reference's decision tree, but
starts from the bucket of the moment's float bits
(:func:`jlowbit.triton_kernels.common.scaled_bucket_index`): two gathers
per element instead of eight, no division, the codes of the reference.

Divisions by the scalars ``bc1`` and ``sqrt(bc2)`` are multiplications by
their correctly rounded reciprocals, exactly what XLA makes of ``x / scalar``
in the ``jax.numpy`` reference. The per-element division and square root of
the direction use the GPU's fast approximations (within 2 ulp; XLA's own GPU
division is approximate too), and compiled Triton may contract ``a * b + c``
into an FMA, so compiled results can differ from the reference by a few ulp
(and, rarely, a moment code by one step); the interpreter matches it bit for
bit.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jlowbit import _reference as ref
from jlowbit import _validation as val
from jlowbit import codebooks
from jlowbit.blockwise8 import BLOCKSIZES
from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

TILE_ELEMENTS = 2048  # elements per program (more when a block is larger)
NUM_WARPS = 8  # per TILE_ELEMENTS: 8 elements per thread at any tile size
VECTOR_CHUNK = 16  # leaves whose size it divides get vectorized loads/stores
CODE_BITS = 8


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A fused update kernel: its moments (in order) and ``hyper`` layout.

  ``exact_direction_dtype``: a narrower dtype that holds every direction
  value exactly (Lion's signs, NaN included, in bfloat16), written by the
  kernel instead of the gradient's dtype and widened by XLA in the fusion
  that applies the update: 2 bytes per parameter less traffic each way.
  """
  kernel: str
  moments: tuple[str, ...]
  hyper: tuple[str, ...]
  exact_direction_dtype: object = None


ALGORITHMS = {
    "adam": Algorithm("adam_kernel", ("m", "v"), ("b1", "b2", "eps", "bc1", "bc2")),
    "ademamix": Algorithm("ademamix_kernel", ("m1", "m2", "nu"),
                          ("b1", "b2", "b3", "alpha", "eps", "bc1", "bc2")),
    "lion": Algorithm("lion_kernel", ("m",), ("b1", "b2"), jnp.bfloat16),
    "momentum": Algorithm("momentum_kernel", ("m",), ("momentum", "first")),
    "rmsprop": Algorithm("rmsprop_kernel", ("v",), ("decay", "eps")),
    "adagrad": Algorithm("adagrad_kernel", ("v",), ("eps",)),
}


@triton.jit
def _program_tile(n_chunks, CHUNK: tl.constexpr, TILE: tl.constexpr):
  """This program's int64 offsets ``[TILE]``, their mask, and ``n``.

  ``n = n_chunks * CHUNK``: with ``CHUNK = 16`` Triton knows that the mask is
  constant over 16 lanes and vectorizes the loads and stores.
  """
  n = n_chunks * CHUNK
  offsets = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
  return offsets, offsets < n, n


@triton.jit
def _load_grad(g_ptr, offsets, mask):
  return tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_blocks(n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  """This program's block indices ``[TILE // BLOCKSIZE]`` and their mask."""
  block = tl.program_id(0) * (TILE // BLOCKSIZE) + tl.arange(0, TILE // BLOCKSIZE)
  return block, block < tl.cdiv(n, BLOCKSIZE)


@triton.jit
def _load_moment(codes_ptr, absmax_ptr, qmap_ptr, offsets, mask, n,
                 BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  """Loads and dequantizes one moment tile (float32 ``[TILE]``; lanes off
  ``mask`` hold garbage, which :func:`_store_moment` and the stores drop)."""
  codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
  block, block_mask = _tile_blocks(n, BLOCKSIZE, TILE)
  absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
  return tl.load(qmap_ptr + codes) * common.broadcast_rows(
      absmax, TILE // BLOCKSIZE, BLOCKSIZE)


@triton.jit
def _store_moment(value, codes_ptr, absmax_ptr, qmap_ptr, starts_ptr, offsets,
                  mask, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                  CODE_BITS: tl.constexpr, STEPS: tl.constexpr):
  """Requantizes one moment tile blockwise; stores its codes and absmax.

  ``qmap_ptr``: the codebook, followed by its sorted thresholds;
  ``starts_ptr``: its bucket starts. Lanes off ``mask`` are zeroed first so
  they cannot raise a block's absmax.
  """
  codes, absmax = common.quantize_flat_tile(
      tl.where(mask, value, 0.0), qmap_ptr + (1 << CODE_BITS), starts_ptr,
      BLOCKSIZE, TILE // BLOCKSIZE, CODE_BITS, STEPS)
  tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=mask)
  block, block_mask = _tile_blocks(n, BLOCKSIZE, TILE)
  tl.store(absmax_ptr + block, absmax, mask=block_mask)


@triton.jit
def _store_direction(d_ptr, d, offsets, mask):
  tl.store(d_ptr + offsets, d.to(d_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ema(old, new, beta):
  return beta * old + (1.0 - beta) * new


@triton.jit
def _sign(x):
  """``jnp.sign``: -1, +1, and ``x`` itself for +-0 and NaN."""
  return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))


@triton.jit
def _reciprocal(x):
  """``1 / x`` of a scalar, correctly rounded."""
  return tl.math.div_rn(tl.full((), 1.0, tl.float32), x)


@triton.jit
def _normalized(numerator, second, bc2, eps):
  """``numerator / (sqrt(second) / sqrt(bc2) + eps)``; the scalar division
  as ``* (1 / sqrt(bc2))``, the form XLA rewrites ``x / scalar`` into."""
  denominator = tl.sqrt(second) * _reciprocal(tl.sqrt_rn(bc2)) + eps
  return numerator / denominator


@triton.jit
def adam_kernel(g_ptr, m_codes_ptr, m_absmax_ptr, v_codes_ptr, v_absmax_ptr,
                qmaps_ptr, starts_ptr, hyper_ptr, n_chunks, d_ptr, m_codes_out,
                m_absmax_out, v_codes_out, v_absmax_out,
                BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                CHUNK: tl.constexpr, CODE_BITS: tl.constexpr,
                STEPS: tl.constexpr):
  signed, signed_starts = qmaps_ptr, starts_ptr
  unsigned = qmaps_ptr + (2 << CODE_BITS)
  unsigned_starts = starts_ptr + 2 * common.BUCKETS
  b1 = tl.load(hyper_ptr)
  b2 = tl.load(hyper_ptr + 1)
  eps = tl.load(hyper_ptr + 2)
  bc1 = tl.load(hyper_ptr + 3)
  bc2 = tl.load(hyper_ptr + 4)
  offsets, mask, n = _program_tile(n_chunks, CHUNK, TILE)
  g = _load_grad(g_ptr, offsets, mask)
  m = _load_moment(m_codes_ptr, m_absmax_ptr, signed, offsets, mask, n,
                      BLOCKSIZE, TILE)
  v = _load_moment(v_codes_ptr, v_absmax_ptr, unsigned, offsets, mask, n,
                      BLOCKSIZE, TILE)
  m = _ema(m, g, b1)
  v = b2 * v + (1.0 - b2) * g * g
  d = _normalized(m * _reciprocal(bc1), v, bc2, eps)
  _store_direction(d_ptr, d, offsets, mask)
  _store_moment(m, m_codes_out, m_absmax_out, signed, signed_starts, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)
  _store_moment(v, v_codes_out, v_absmax_out, unsigned, unsigned_starts, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)


@triton.jit
def ademamix_kernel(g_ptr, m1_codes_ptr, m1_absmax_ptr, m2_codes_ptr,
                    m2_absmax_ptr, nu_codes_ptr, nu_absmax_ptr, qmaps_ptr,
                    starts_ptr, hyper_ptr, n_chunks, d_ptr, m1_codes_out, m1_absmax_out,
                    m2_codes_out, m2_absmax_out, nu_codes_out, nu_absmax_out,
                    BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                    CHUNK: tl.constexpr, CODE_BITS: tl.constexpr,
                STEPS: tl.constexpr):
  signed, signed_starts = qmaps_ptr, starts_ptr
  unsigned = qmaps_ptr + (2 << CODE_BITS)
  unsigned_starts = starts_ptr + 2 * common.BUCKETS
  b1 = tl.load(hyper_ptr)
  b2 = tl.load(hyper_ptr + 1)
  b3 = tl.load(hyper_ptr + 2)
  alpha = tl.load(hyper_ptr + 3)
  eps = tl.load(hyper_ptr + 4)
  bc1 = tl.load(hyper_ptr + 5)
  bc2 = tl.load(hyper_ptr + 6)
  offsets, mask, n = _program_tile(n_chunks, CHUNK, TILE)
  g = _load_grad(g_ptr, offsets, mask)
  m1 = _load_moment(m1_codes_ptr, m1_absmax_ptr, signed, offsets, mask, n,
                      BLOCKSIZE, TILE)
  m2 = _load_moment(m2_codes_ptr, m2_absmax_ptr, signed, offsets, mask, n,
                      BLOCKSIZE, TILE)
  nu = _load_moment(nu_codes_ptr, nu_absmax_ptr, unsigned, offsets, mask, n,
                      BLOCKSIZE, TILE)
  m1 = _ema(m1, g, b1)
  m2 = _ema(m2, g, b3)
  nu = b2 * nu + (1.0 - b2) * g * g
  d = _normalized(m1 * _reciprocal(bc1) + alpha * m2, nu, bc2, eps)
  _store_direction(d_ptr, d, offsets, mask)
  _store_moment(m1, m1_codes_out, m1_absmax_out, signed, signed_starts, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)
  _store_moment(m2, m2_codes_out, m2_absmax_out, signed, signed_starts, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)
  _store_moment(nu, nu_codes_out, nu_absmax_out, unsigned, unsigned_starts, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)


@triton.jit
def lion_kernel(g_ptr, m_codes_ptr, m_absmax_ptr, qmaps_ptr, starts_ptr, hyper_ptr,
                n_chunks, d_ptr, m_codes_out, m_absmax_out,
                BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                CHUNK: tl.constexpr, CODE_BITS: tl.constexpr,
                STEPS: tl.constexpr):
  b1 = tl.load(hyper_ptr)
  b2 = tl.load(hyper_ptr + 1)
  offsets, mask, n = _program_tile(n_chunks, CHUNK, TILE)
  g = _load_grad(g_ptr, offsets, mask)
  m = _load_moment(m_codes_ptr, m_absmax_ptr, qmaps_ptr, offsets, mask, n,
                      BLOCKSIZE, TILE)
  _store_direction(d_ptr, _sign(_ema(m, g, b1)), offsets, mask)
  _store_moment(_ema(m, g, b2), m_codes_out, m_absmax_out, qmaps_ptr, starts_ptr, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)


@triton.jit
def momentum_kernel(g_ptr, m_codes_ptr, m_absmax_ptr, qmaps_ptr, starts_ptr, hyper_ptr,
                    n_chunks, d_ptr, m_codes_out, m_absmax_out,
                    BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                    CHUNK: tl.constexpr, CODE_BITS: tl.constexpr,
                STEPS: tl.constexpr):
  momentum = tl.load(hyper_ptr)
  first = tl.load(hyper_ptr + 1)
  offsets, mask, n = _program_tile(n_chunks, CHUNK, TILE)
  g = _load_grad(g_ptr, offsets, mask)
  m = _load_moment(m_codes_ptr, m_absmax_ptr, qmaps_ptr, offsets, mask, n,
                      BLOCKSIZE, TILE)
  m = tl.where(first != 0.0, g, momentum * m + g)
  _store_direction(d_ptr, m, offsets, mask)
  _store_moment(m, m_codes_out, m_absmax_out, qmaps_ptr, starts_ptr, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)


@triton.jit
def rmsprop_kernel(g_ptr, v_codes_ptr, v_absmax_ptr, qmaps_ptr, starts_ptr, hyper_ptr,
                   n_chunks, d_ptr, v_codes_out, v_absmax_out,
                   BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                   CHUNK: tl.constexpr, CODE_BITS: tl.constexpr,
                STEPS: tl.constexpr):
  unsigned = qmaps_ptr + (2 << CODE_BITS)
  unsigned_starts = starts_ptr + 2 * common.BUCKETS
  decay = tl.load(hyper_ptr)
  eps = tl.load(hyper_ptr + 1)
  offsets, mask, n = _program_tile(n_chunks, CHUNK, TILE)
  g = _load_grad(g_ptr, offsets, mask)
  v = _load_moment(v_codes_ptr, v_absmax_ptr, unsigned, offsets, mask, n,
                      BLOCKSIZE, TILE)
  v = decay * v + (1.0 - decay) * g * g
  _store_direction(d_ptr, g / (tl.sqrt(v) + eps), offsets, mask)
  _store_moment(v, v_codes_out, v_absmax_out, unsigned, unsigned_starts, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)


@triton.jit
def adagrad_kernel(g_ptr, v_codes_ptr, v_absmax_ptr, qmaps_ptr, starts_ptr, hyper_ptr,
                   n_chunks, d_ptr, v_codes_out, v_absmax_out,
                   BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                   CHUNK: tl.constexpr, CODE_BITS: tl.constexpr,
                STEPS: tl.constexpr):
  unsigned = qmaps_ptr + (2 << CODE_BITS)
  unsigned_starts = starts_ptr + 2 * common.BUCKETS
  eps = tl.load(hyper_ptr)
  offsets, mask, n = _program_tile(n_chunks, CHUNK, TILE)
  g = _load_grad(g_ptr, offsets, mask)
  v = _load_moment(v_codes_ptr, v_absmax_ptr, unsigned, offsets, mask, n,
                      BLOCKSIZE, TILE)
  v = v + g * g
  _store_direction(d_ptr, g / (tl.sqrt(v) + eps), offsets, mask)
  _store_moment(v, v_codes_out, v_absmax_out, unsigned, unsigned_starts, offsets,
                mask, n, BLOCKSIZE, TILE, CODE_BITS, STEPS)


@functools.cache
def _search_tables() -> tuple[np.ndarray, np.ndarray, int]:
  """(qmaps, bucket starts, comparisons per search) of the two codebooks."""
  maps, starts, steps = [], [], []
  for signed in (True, False):
    code = codebooks.dynamic(signed)
    thresholds, bucket_starts, bucket_steps = ref.code_search(code)
    maps.append((code, thresholds))
    starts.append(bucket_starts)
    steps.append(bucket_steps)
  assert min(steps) > 0, "the dynamic codebooks have bucketed searches"
  maps, starts = np.asarray(maps, np.float32), np.asarray(starts, np.uint8)
  maps.setflags(write=False)
  starts.setflags(write=False)
  return maps, starts, max(steps)


def qmaps() -> np.ndarray:
  """float32 ``[2, 2, 256]``: [signed, unsigned] x [codebook, thresholds]
  (sorted, NaN last: :func:`jlowbit._reference.bucket_search_table`)."""
  return _search_tables()[0]


def bucket_starts() -> np.ndarray:
  """uint8 ``[2, 2 * BUCKETS]``: the bucket starts of [signed, unsigned]."""
  return _search_tables()[1]


Moment = tuple[jax.Array, jax.Array]


def _check_moments(algorithm: str, grad: jax.Array, moments, block_size: int) -> None:
  names = ALGORITHMS[algorithm].moments
  if not isinstance(moments, (tuple, list)) or len(moments) != len(names):
    raise ValueError(f"moments must be {len(names)} (codes, absmax) pairs "
                     f"{names} for {algorithm=}")
  absmax_shape = (cdiv(grad.size, block_size),)
  for name, moment in zip(names, moments):
    if not isinstance(moment, (tuple, list)) or len(moment) != 2:
      raise ValueError(f"moment {name!r} must be a (codes, absmax) pair")
    codes, absmax = moment
    val.check_array(codes, f"{name} codes")
    val.check_array(absmax, f"{name} absmax")
    if codes.dtype != jnp.uint8 or codes.shape != grad.shape:
      raise ValueError(f"{name} codes must be uint8 of grad.shape={grad.shape}, "
                       f"got {jnp.dtype(codes.dtype).name}{tuple(codes.shape)}")
    if absmax.dtype != jnp.float32 or absmax.shape != absmax_shape:
      raise ValueError(f"{name} absmax must be float32{absmax_shape} "
                       f"(ceil(grad.size / {block_size=})), got "
                       f"{jnp.dtype(absmax.dtype).name}{tuple(absmax.shape)}")


def _check_hyper(algorithm: str, hyper: jax.Array) -> None:
  names = ALGORITHMS[algorithm].hyper
  val.check_array(hyper, "hyper")
  if hyper.dtype != jnp.float32 or hyper.shape != (len(names),):
    raise ValueError(f"hyper for {algorithm=} must be float32[{len(names)}] "
                     f"[{', '.join(names)}], got "
                     f"{jnp.dtype(hyper.dtype).name}{tuple(hyper.shape)}")


def fused_update(algorithm: str, grad: jax.Array, moments: tuple[Moment, ...],
                 hyper: jax.Array, *, block_size: int,
                 impl: str) -> tuple[jax.Array, tuple[Moment, ...]]:
  r"""One fused 8-bit optimizer step for one leaf (see the module docstring).

  Args:
    algorithm: ``"adam"``, ``"ademamix"``, ``"lion"``, ``"momentum"``,
      ``"rmsprop"`` or ``"adagrad"``.
    grad: float32, bfloat16 or float16 gradient, any shape.
    moments: one ``(codes, absmax)`` pair per moment of ``algorithm``, in the
      order of ``ALGORITHMS[algorithm].moments``: ``codes`` uint8 of
      ``grad.shape``, ``absmax`` float32 ``[ceil(grad.size / block_size)]``.
    hyper: float32 ``[len(ALGORITHMS[algorithm].hyper)]``, may be traced.
    block_size: elements per quantization block, one of 64, 128, ..., 4096.
    impl: ``"triton"`` or ``"interpret"``.

  Returns:
    ``(direction, new_moments)``: ``direction`` of ``grad.shape`` and dtype;
    ``new_moments`` like ``moments``. The codes and absmax are updated in
    place (``input_output_aliases``) when the caller donates them. An empty
    leaf launches nothing and returns its moments unchanged.
  """
  val.check_choice(algorithm, "algorithm", ALGORITHMS)
  val.check_choice(impl, "impl", ("triton", "interpret"))
  val.check_choice(block_size, "block_size", BLOCKSIZES)
  val.check_float_array(grad, "grad")
  _check_moments(algorithm, grad, moments, block_size)
  _check_hyper(algorithm, hyper)
  moments = tuple((codes, absmax) for codes, absmax in moments)
  n = grad.size
  if n == 0:
    return jnp.zeros(grad.shape, grad.dtype), moments
  direction_dtype = ALGORITHMS[algorithm].exact_direction_dtype or grad.dtype
  tile = max(TILE_ELEMENTS, block_size)
  chunk = VECTOR_CHUNK if n % VECTOR_CHUNK == 0 else 1
  flat_moments = [a for codes, absmax in moments for a in (codes.reshape(-1), absmax)]
  moment_shapes = [jax.ShapeDtypeStruct((n,), jnp.uint8),
                   jax.ShapeDtypeStruct((cdiv(n, block_size),), jnp.float32)]
  outs = launch(
      __name__, ALGORITHMS[algorithm].kernel, grad.reshape(-1), *flat_moments,
      jnp.asarray(qmaps()), jnp.asarray(bucket_starts()), hyper, n // chunk,
      out_shape=(jax.ShapeDtypeStruct((n,), direction_dtype),
                 *moment_shapes * len(moments)),
      grid=(cdiv(n, tile),), impl=impl,
      input_output_aliases={i: i for i in range(1, len(flat_moments) + 1)},
      num_warps=NUM_WARPS * tile // TILE_ELEMENTS, BLOCKSIZE=block_size,
      TILE=tile, CHUNK=chunk, CODE_BITS=CODE_BITS, STEPS=_search_tables()[2])
  new_moments = tuple((outs[i].reshape(grad.shape), outs[i + 1])
                      for i in range(1, len(outs), 2))
  return outs[0].astype(grad.dtype).reshape(grad.shape), new_moments
