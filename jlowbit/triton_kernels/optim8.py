r"""Fused 8-bit optimizer updates: one kernel launch for many parameter leaves.

A kernel reads each leaf's gradient ``g`` and 8-bit moments (uint8 codes +
float32 per-block absmax), dequantizes them (``code[codes] * absmax``), does
the float32 update math of its algorithm, writes the *direction* in the
gradient's dtype (or leaves it to XLA: :func:`writes_direction`) and
requantizes every new moment blockwise in place (``absmax`` = max |moment|
per block, nearest code, ties to the lower index, or stochastic rounding,
exactly as :func:`jlowbit.blockwise8.quantize_blockwise_reference`).

A program owns ``TILE`` consecutive elements of one flattened leaf, i.e.
``TILE // BLOCKSIZE`` whole quantization blocks, as one flat tile (reshaped to
``[blocks, BLOCKSIZE]`` only for the per-block absmax, so the table gathers
keep a coalesced one-dimensional layout); lanes past the end are masked:
their moments are zeroed before the absmax and never stored.

**Many leaves, one launch.** Each XLA custom call costs a host launch and
splits XLA's CUDA graph, so a model's ~50 large leaves are updated by one
kernel whose grid covers the tiles of all of them. The kernel is generated
for the leaves' layout (:func:`update_kernel`): its arguments are every
leaf's pointers, and a program finds its leaf by a binary search over the
leaves' first tiles written out as nested ``if``\ s (``log2(leaves)``
uniform branches), then runs the one tile body on that leaf's pointers. A
launch holds leaves of one gradient dtype and at most
:data:`MAX_KERNEL_POINTERS` pointers (CUDA's 4 KiB of kernel parameters).
When 16 divides every leaf size of a launch the kernel is told so
(``CHUNK``), which lets Triton vectorize every load and store.

Hyperparameters are one float32 vector ``hyper`` the kernel ``tl.load``\ s
(never ``tl.constexpr``: new values never recompile). Layout and math, with
``m, v, ...`` the dequantized old moments and ``g`` the float32 gradient:

========== ================================ ===================================
algorithm  hyper                            update
========== ================================ ===================================
adam       b1, b2, eps, ibc1, isbc2         m = b1 m + (1-b1) g;
                                            v = b2 v + (1-b2) g g;
                                            d = (m ibc1) / (sqrt(v) isbc2 + eps)
ademamix   b1, b2, b3, alpha, eps, ibc1,    m1 = b1 m1 + (1-b1) g;
           isbc2                            m2 = b3 m2 + (1-b3) g;
                                            nu = b2 nu + (1-b2) g g;
                                            d = (m1 ibc1 + alpha m2) /
                                            (sqrt(nu) isbc2 + eps)
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
``[2, 5, 256]`` array ``qmaps`` (:func:`qmaps`: per codebook the codes,
(code, gap) pairs and the sorted thresholds of two searches) and one uint32 array
of bucket entries (:func:`jlowbit._reference.bucket_search_table`):
requantization compares
``threshold * absmax <= moment`` like the reference's decision tree, but
starts from the bucket keyed by the top 16 bits of ``moment / absmax``
(:func:`jlowbit.triton_kernels.common.scaled_bucket_index`): one 64-bit
gather per element instead of eight, no division, the codes of the reference.

**Stochastic rounding.** Moments flagged ``stochastic`` (AdEMAMix's slow
EMA by default) round to one of their two bracketing codes: the bucketed
search finds the lower one, then
:func:`jlowbit.triton_kernels.common.stochastic_step` (one more 64-bit
gather, of the code and its gap) rounds with the low-discrepancy noise of
:func:`jlowbit._reference.quasi_uniform`: the element's counter (its
position in the concatenation of the call's leaves) sets its phase, and the
step's ``key`` (a uint32 ``[1]`` array) advances every phase by the same
golden-ratio Weyl step. Integer arithmetic only, so the reference draws the
same numbers.

``ibc1 = 1 / (1 - b1**t)`` and ``isbc2 = 1 / sqrt(1 - b2**t)`` are computed
once per step by XLA (scalar work that costs a kernel ~20% of its
instructions per element if every thread redoes it correctly rounded). The
per-element division and square root of the direction use the GPU's fast
approximations (``rcp.approx`` and ``sqrt.approx``, within 2 ulp; XLA's own
GPU division is approximate too), and compiled Triton may contract
``a * b + c`` into an FMA, so compiled results can differ from the reference
by a few ulp (and, rarely, a moment code by one step); the interpreter
divides exactly and matches it bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import linecache
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jlowbit import _reference as ref
from jlowbit import _validation as val
from jlowbit import codebooks
from jlowbit.blockwise8 import BLOCKSIZES
from jlowbit.optax_transforms import update8
from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

TILE_ELEMENTS = 2048  # elements per program (more when a block is larger)
NUM_WARPS = 8  # per TILE_ELEMENTS: 8 elements per thread at any tile size
VECTOR_CHUNK = 16  # launches whose leaf sizes it divides get vectorized I/O
CODE_BITS = 8
QMAP_ROWS = 5  # per codebook in qmaps(): codes, (code, gap) pairs, 2 searches
# Pointer arguments per launch: 8 bytes each within CUDA's 4 KiB of kernel
# parameters, with room for Triton's own.
MAX_KERNEL_POINTERS = 384


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """A fused update: its ``@triton.jit`` math and its moments' names.

  ``math(g, *moments, hyper_ptr) -> (direction, *new_moments)`` in float32,
  the twin of :mod:`jlowbit.optax_transforms.update8`, whose
  ``MOMENT_SIGNED`` (codebook per moment) and ``HYPER_NAMES`` (``hyper``
  layout) it shares.
  ``exact_direction_dtype``: a narrower dtype that holds every direction
  value exactly (Lion's signs, NaN included, in bfloat16), written by the
  kernel instead of the gradient's dtype and widened by XLA in the fusion
  that applies the update: 2 bytes per parameter less traffic each way.
  ``direction_from_state``: the gradient dtypes for which the kernel writes
  no direction (:func:`writes_direction`).
  """
  math: str
  moments: tuple[str, ...]
  exact_direction_dtype: object = None
  direction_from_state: tuple[str, ...] = ()


_16BIT = ("bfloat16", "float16")
ALGORITHMS = {
    "adam": Algorithm("adam_math", ("m", "v"), direction_from_state=("float32",)),
    "ademamix": Algorithm("ademamix_math", ("m1", "m2", "nu")),
    "lion": Algorithm("lion_math", ("m",), jnp.bfloat16, _16BIT),
    "momentum": Algorithm("momentum_math", ("m",), None, ("float32", *_16BIT)),
    "rmsprop": Algorithm("rmsprop_math", ("v",), None, ("float32", *_16BIT)),
    "adagrad": Algorithm("adagrad_math", ("v",), None, ("float32", *_16BIT)),
}


@triton.jit
def _ema(old, new, beta):
  return beta * old + (1.0 - beta) * new


@triton.jit
def _sign(x):
  """``jnp.sign``: -1, +1, and ``x`` itself for +-0 and NaN."""
  return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, x))


@triton.jit
def _normalized(numerator, second, inv_sqrt_bc2, eps):
  """``numerator / (sqrt(second) * inv_sqrt_bc2 + eps)``."""
  return common.fast_divide(numerator, tl.sqrt(second) * inv_sqrt_bc2 + eps)


@triton.jit
def adam_math(g, m, v, hyper_ptr):
  b1 = tl.load(hyper_ptr)
  b2 = tl.load(hyper_ptr + 1)
  eps = tl.load(hyper_ptr + 2)
  inv_bc1 = tl.load(hyper_ptr + 3)
  inv_sqrt_bc2 = tl.load(hyper_ptr + 4)
  m = _ema(m, g, b1)
  v = b2 * v + (1.0 - b2) * g * g
  return _normalized(m * inv_bc1, v, inv_sqrt_bc2, eps), m, v


@triton.jit
def ademamix_math(g, m1, m2, nu, hyper_ptr):
  b1 = tl.load(hyper_ptr)
  b2 = tl.load(hyper_ptr + 1)
  b3 = tl.load(hyper_ptr + 2)
  alpha = tl.load(hyper_ptr + 3)
  eps = tl.load(hyper_ptr + 4)
  inv_bc1 = tl.load(hyper_ptr + 5)
  inv_sqrt_bc2 = tl.load(hyper_ptr + 6)
  m1 = _ema(m1, g, b1)
  m2 = _ema(m2, g, b3)
  nu = b2 * nu + (1.0 - b2) * g * g
  return (_normalized(m1 * inv_bc1 + alpha * m2, nu, inv_sqrt_bc2, eps),
          m1, m2, nu)


@triton.jit
def lion_math(g, m, hyper_ptr):
  b1 = tl.load(hyper_ptr)
  b2 = tl.load(hyper_ptr + 1)
  return _sign(_ema(m, g, b1)), _ema(m, g, b2)


@triton.jit
def momentum_math(g, m, hyper_ptr):
  momentum = tl.load(hyper_ptr)
  first = tl.load(hyper_ptr + 1)
  m = tl.where(first != 0.0, g, momentum * m + g)
  return m, m


@triton.jit
def rmsprop_math(g, v, hyper_ptr):
  decay = tl.load(hyper_ptr)
  eps = tl.load(hyper_ptr + 1)
  v = decay * v + (1.0 - decay) * g * g
  return common.fast_divide(g, tl.sqrt(v) + eps), v


@triton.jit
def adagrad_math(g, v, hyper_ptr):
  eps = tl.load(hyper_ptr)
  v = v + g * g
  return common.fast_divide(g, tl.sqrt(v) + eps), v


@triton.jit
def _leaf_tile(tile, n_chunks, CHUNK: tl.constexpr, TILE: tl.constexpr):
  """Tile ``tile`` of a leaf: int64 offsets ``[TILE]``, their mask, ``n``.

  ``n = n_chunks * CHUNK``: with ``CHUNK = 16`` Triton knows that the mask is
  constant over 16 lanes and vectorizes the loads and stores.
  """
  n = n_chunks * CHUNK
  offsets = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
  return offsets, offsets < n, n


@triton.jit
def _load_grad(g_ptr, offsets, mask):
  return tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_blocks(tile, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  """Block indices ``[TILE // BLOCKSIZE]`` of leaf tile ``tile``; their mask."""
  block = tile * (TILE // BLOCKSIZE) + tl.arange(0, TILE // BLOCKSIZE)
  return block, block < tl.cdiv(n, BLOCKSIZE)


@triton.jit
def _load_moment(codes_ptr, absmax_ptr, code_ptr, tile, offsets, mask, n,
                 BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
  """Loads and dequantizes one moment tile (float32 ``[TILE]``; lanes off
  ``mask`` hold garbage, which :func:`_store_moment` and the stores drop)."""
  codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
  block, block_mask = _tile_blocks(tile, n, BLOCKSIZE, TILE)
  absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
  return tl.load(code_ptr + codes) * common.broadcast_rows(
      absmax, TILE // BLOCKSIZE, BLOCKSIZE)


@triton.jit
def _store_moment(value, codes_ptr, absmax_ptr, search_ptr, buckets_ptr,
                  pairs_ptr, tile, offsets, mask, n, BLOCKSIZE: tl.constexpr,
                  TILE: tl.constexpr, units, CODE_BITS: tl.constexpr,
                  STEPS: tl.constexpr, STOCHASTIC: tl.constexpr):
  """Requantizes one moment tile blockwise; stores its codes and absmax.

  ``search_ptr``, ``buckets_ptr``, ``STEPS``: the codebook's search for the
  nearest code, or with ``STOCHASTIC`` for the lower bracketing code, which
  then rounds stochastically through the (code, gap) pairs at ``pairs_ptr``
  with the noise ``units`` (:func:`_noise`). Lanes off ``mask`` are zeroed
  first so they cannot raise a block's absmax.
  """
  codes, absmax = common.quantize_flat_tile(
      tl.where(mask, value, 0.0), search_ptr, buckets_ptr, BLOCKSIZE,
      TILE // BLOCKSIZE, CODE_BITS, STEPS, pairs_ptr, units, STOCHASTIC)
  tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=mask)
  block, block_mask = _tile_blocks(tile, n, BLOCKSIZE, TILE)
  tl.store(absmax_ptr + block, absmax, mask=block_mask)


@triton.jit
def _noise(key_ptr, tile, counter, TILE: tl.constexpr):
  """Rounding noise of leaf tile ``tile`` (:func:`common.quasi_uniform_units`)
  at the step offset ``key``: element ``j`` of the leaf has the counter
  ``counter + j`` (modulo ``2**32``)."""
  first = (tile.to(tl.uint32) * TILE + counter).to(tl.uint32)
  return common.quasi_uniform_units(first + tl.arange(0, TILE).to(tl.uint32),
                                    tl.load(key_ptr))


@triton.jit
def _store_direction(d_ptr, d, offsets, mask):
  tl.store(d_ptr + offsets, d.to(d_ptr.dtype.element_ty), mask=mask)


# Leaf layout of a launch: per leaf (first tile in the grid, n // CHUNK,
# noise counter of its first element).
Layout = tuple[tuple[int, int, int], ...]


def writes_direction(algorithm: str, grad_dtype) -> bool:
  """Whether the kernel writes the update direction of ``grad_dtype``
  gradients, or leaves it to the wrapper, which computes it from the step's
  old state with the reference math
  (:func:`jlowbit.optax_transforms.update8.direction_8bit_reference`), an
  expression XLA fuses into the update's consumer (``optax.apply_updates``).
  A written direction is written and read back (twice its size); one from
  the state reads the old codes (a byte per moment) and the gradient again
  in a fusion that gathers from the codebooks. Chosen per algorithm and
  gradient dtype by what was faster on an H100 (``benchmarks/RESULTS.md``,
  optimizer runs 5-6): from the state for SGD-momentum, RMSprop and Adagrad
  (one moment: 5 vs 8 bytes in float32), float32 Adam (6 vs 8) and 16-bit
  Lion (3 vs 4); written for AdEMAMix (7 vs 8 in float32, but its
  three-codebook fusion ran 2% slower), 16-bit Adam (4 vs 4) and float32
  Lion (bfloat16 signs: 4 vs 5)."""
  return jnp.dtype(grad_dtype).name not in ALGORITHMS[algorithm].direction_from_state


def _leaf_pointers(suffix: str, moments: int,
                   direction: bool) -> tuple[list[str], list[str]]:
  """Names of one leaf's (input, output) pointers: ``g``, ``c<j>``/``a<j>``
  (codes/absmax of moment j), ``d`` (with ``direction``),
  ``oc<j>``/``oa<j>``, each + ``suffix``."""
  pairs = [f"{p}{j}{suffix}" for j in range(moments) for p in "ca"]
  outs = [f"d{suffix}"] if direction else []
  return [f"g{suffix}", *pairs], [*outs, *("o" + p for p in pairs)]


def _leaf_dispatch(layout: Layout, moments: int, direction: bool, lo: int,
                   hi: int, indent: str) -> list[str]:
  """Nested ``if``\\ s calling the tile function on the leaf (of ``lo:hi``)
  that owns ``tile``."""
  if hi - lo == 1:
    first, n_chunks, counter = layout[lo]
    ins, outs = _leaf_pointers(f"_{lo}", moments, direction)
    return [f"{indent}_update_tile({', '.join(ins + outs)}, qmaps_ptr, "
            f"buckets_ptr, hyper_ptr, key_ptr, tile - {first}, {n_chunks}, "
            f"{counter}, BLOCKSIZE, TILE, CHUNK, CODE_BITS)"]
  mid = (lo + hi) // 2
  return ([f"{indent}if tile < {layout[mid][0]}:"]
          + _leaf_dispatch(layout, moments, direction, lo, mid, indent + "  ")
          + [f"{indent}else:"]
          + _leaf_dispatch(layout, moments, direction, mid, hi, indent + "  "))


_CONSTEXPRS = ("BLOCKSIZE", "TILE", "CHUNK", "CODE_BITS")


def _kernel_source(algorithm: str, layout: Layout, stochastic: tuple[bool, ...],
                   direction: bool) -> str:
  """Source of the tile function ``_update_tile`` and the kernel (which
  writes the direction if ``direction``)."""
  alg, signed = ALGORITHMS[algorithm], update8.MOMENT_SIGNED[algorithm]
  k = len(alg.moments)
  constexprs = [f"{c}: tl.constexpr" for c in _CONSTEXPRS]
  book = lambda j: 0 if signed[j] else 1  # codebook of moment j
  qmap = lambda j, row: f"qmaps_ptr + {(QMAP_ROWS * book(j) + row) << CODE_BITS}"
  search = lambda j: (  # thresholds, bucket entries, (code, gap) pairs
      f"{qmap(j, 3 + stochastic[j])}, "
      f"buckets_ptr + {(2 * book(j) + stochastic[j]) * 2 * ref.BUCKET_KEYS}, "
      f"{qmap(j, 1)}")
  steps = lambda j: _search_tables()[2][book(j)][stochastic[j]]
  moments = ", ".join(f"m{j}" for j in range(k))
  tile_args = "tile, offsets, mask, n, BLOCKSIZE, TILE"
  ins, outs = _leaf_pointers("_ptr", k, direction)
  tile_params = [*ins, *outs, "qmaps_ptr", "buckets_ptr", "hyper_ptr", "key_ptr",
                 "tile", "n_chunks", "counter", *constexprs]
  noise = ["units = _noise(key_ptr, tile, counter, TILE)"] if any(stochastic) else []
  tile_body = [
      "offsets, mask, n = _leaf_tile(tile, n_chunks, CHUNK, TILE)",
      "grad = _load_grad(g_ptr, offsets, mask)",
      *(f"m{j} = _load_moment(c{j}_ptr, a{j}_ptr, {qmap(j, 0)}, {tile_args})"
        for j in range(k)),
      f"direction, {moments} = {alg.math}(grad, {moments}, hyper_ptr)",
      *(["_store_direction(d_ptr, direction, offsets, mask)"] if direction else []),
      *noise,
      *(f"_store_moment(m{j}, oc{j}_ptr, oa{j}_ptr, {search(j)}, {tile_args}, "
        f"{'units' if stochastic[j] else 'None'}, CODE_BITS, {steps(j)}, "
        f"{stochastic[j]})" for j in range(k)),
  ]
  ins, outs = zip(*(_leaf_pointers(f"_{i}", k, direction)
                    for i in range(len(layout))))
  params = [*sum(ins, []), "qmaps_ptr", "buckets_ptr", "hyper_ptr", "key_ptr",
            *sum(outs, []), *constexprs]
  body = ["tile = tl.program_id(0)",
          *_leaf_dispatch(layout, k, direction, 0, len(layout), "")]
  return (f"def _update_tile({', '.join(tile_params)}):\n"
          + "".join(f"  {line}\n" for line in tile_body)
          + f"\n\ndef {algorithm}_update_kernel({', '.join(params)}):\n"
          + "".join(f"  {line}\n" for line in body))


@functools.cache
def update_kernel(algorithm: str, layout: Layout, stochastic: tuple[bool, ...],
                  direction: bool) -> triton.JITFunction:
  """The ``@triton.jit`` update kernel of ``algorithm`` over ``layout``.

  Arguments: per leaf ``g, (codes, absmax) per moment``; then ``qmaps``,
  ``buckets``, ``hyper``, ``key`` (uint32 ``[1]``, the rounding noise's
  step offset, read only when a moment of ``stochastic`` is true); then per
  leaf the outputs ``d`` (if ``direction``: :func:`writes_direction`),
  ``(codes, absmax)`` per moment; then the constexprs.
  The source is registered with :mod:`linecache` so that Triton (and its
  interpreter) can read it.
  """
  source = _kernel_source(algorithm, layout, stochastic, direction)
  digest = hashlib.sha256(source.encode()).hexdigest()[:16]
  filename = f"<jlowbit.optim8 {algorithm} {digest}>"
  linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
  namespace = dict(globals())
  exec(compile(source, filename, "exec"), namespace)  # pylint: disable=exec-used
  namespace["_update_tile"] = triton.jit(namespace["_update_tile"], noinline=True)
  return triton.jit(namespace[f"{algorithm}_update_kernel"])


@functools.cache
def _search_tables() -> tuple[np.ndarray, np.ndarray, tuple]:
  """(qmaps, bucket entries, comparisons per search) of the two codebooks."""
  maps, buckets, steps = [], [], []
  for signed in (True, False):
    code = codebooks.dynamic(signed)
    gaps = ref.code_gaps(code) * 2.0**-ref.UNIFORM_BITS
    searches = [ref.code_search(code, floor) for floor in (False, True)]
    maps.append(np.concatenate([[code], np.stack([code, gaps], -1).reshape(2, -1),
                                [thresholds for thresholds, _, _ in searches]]))
    buckets.append([entries for _, entries, _ in searches])
    steps.append(tuple(s for _, _, s in searches))
  assert min(min(s) for s in steps) > 0, "the dynamic codebooks have bucketed searches"
  maps, buckets = np.asarray(maps, np.float32), np.asarray(buckets, np.uint32)
  maps.setflags(write=False)
  buckets.setflags(write=False)
  return maps, buckets, tuple(steps)


def qmaps() -> np.ndarray:
  """float32 ``[2, QMAP_ROWS, 256]``: [signed, unsigned] x [codebook, 256
  (code, gap) pairs (rows 1-2: ``code[i]`` and
  :func:`jlowbit._reference.code_gaps` ``[i]`` times ``2**-24``, as the
  kernels draw noise in units of ``2**-24``), the sorted thresholds of the
  nearest-code search, those of the lower bracketing code's search (each
  NaN last: :func:`jlowbit._reference.code_search`)]."""
  return _search_tables()[0]


def bucket_entries() -> np.ndarray:
  """uint32 ``[2, 2, BUCKET_KEYS, 2]``: the bucket entries of [signed,
  unsigned] x [nearest-code search, lower-bracketing-code search]."""
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
  names = update8.HYPER_NAMES[algorithm]
  val.check_array(hyper, "hyper")
  if hyper.dtype != jnp.float32 or hyper.shape != (len(names),):
    raise ValueError(f"hyper for {algorithm=} must be float32[{len(names)}] "
                     f"[{', '.join(names)}], got "
                     f"{jnp.dtype(hyper.dtype).name}{tuple(hyper.shape)}")


def _launches(algorithm: str, grads: Sequence[jax.Array]) -> list[list[int]]:
  """Leaf indices per launch: non-empty leaves grouped by gradient dtype and
  by whether 16 divides their size, at most MAX_KERNEL_POINTERS each."""
  per_leaf = 2 + 4 * len(ALGORITHMS[algorithm].moments)
  groups: dict[tuple, list[int]] = {}
  for i, grad in enumerate(grads):
    if grad.size:
      key = (jnp.dtype(grad.dtype), grad.size % VECTOR_CHUNK == 0)
      groups.setdefault(key, []).append(i)
  most = MAX_KERNEL_POINTERS // per_leaf
  return [leaves[i:i + most] for leaves in groups.values()
          for i in range(0, len(leaves), most)]


def _launch(algorithm: str, grads: Sequence[jax.Array],
            moments: Sequence[tuple[Moment, ...]], hyper: jax.Array,
            block_size: int, impl: str, counters: Sequence[int],
            stochastic: tuple[bool, ...], key: jax.Array
            ) -> list[tuple[jax.Array, tuple[Moment, ...]]]:
  """One kernel launch over non-empty leaves of one dtype; ``counters``:
  each leaf's first noise counter."""
  alg = ALGORITHMS[algorithm]
  direction = writes_direction(algorithm, grads[0].dtype)
  tile = max(TILE_ELEMENTS, block_size)
  chunk = VECTOR_CHUNK if all(g.size % VECTOR_CHUNK == 0 for g in grads) else 1
  layout, first = [], 0
  for grad, counter in zip(grads, counters):
    layout.append((first, grad.size // chunk, counter % (1 << 32)))
    first += cdiv(grad.size, tile)
  args, out_shape, aliases = [], [], {}
  for grad, leaf_moments in zip(grads, moments):
    n = grad.size
    args.append(grad.reshape(-1))
    if direction:
      out_shape.append(jax.ShapeDtypeStruct(
          (n,), alg.exact_direction_dtype or grad.dtype))
    for codes, absmax in leaf_moments:
      for array in (codes.reshape(-1), absmax):
        aliases[len(args)] = len(out_shape)
        args.append(array)
        out_shape.append(jax.ShapeDtypeStruct(array.shape, array.dtype))
  outs = launch(
      __name__, "update_kernel", *args, jnp.asarray(qmaps()),
      jnp.asarray(bucket_entries()), hyper, key,
      kernel_args=(algorithm, tuple(layout), stochastic, direction),
      out_shape=out_shape,
      grid=(first,), impl=impl, input_output_aliases=aliases,
      num_warps=NUM_WARPS * tile // TILE_ELEMENTS, BLOCKSIZE=block_size,
      TILE=tile, CHUNK=chunk, CODE_BITS=CODE_BITS)
  per_leaf = 2 * len(alg.moments) + direction
  results = []
  for i, (grad, leaf_moments) in enumerate(zip(grads, moments)):
    flat = outs[i * per_leaf:(i + 1) * per_leaf]
    if direction:
      d, *flat = flat
    else:
      d = update8.direction_8bit_reference(algorithm, grad, leaf_moments,
                                           hyper, block_size=block_size)
    results.append((d.astype(grad.dtype).reshape(grad.shape),
                    tuple((flat[j].reshape(grad.shape), flat[j + 1])
                          for j in range(0, len(flat), 2))))
  return results


def fused_update_leaves(
    algorithm: str, grads: Sequence[jax.Array],
    moments: Sequence[tuple[Moment, ...]], hyper: jax.Array, *,
    block_size: int, impl: str, stochastic: tuple[bool, ...] | None = None,
    key: jax.Array | None = None) -> list[tuple[jax.Array, tuple[Moment, ...]]]:
  r"""One fused 8-bit optimizer step for many leaves, in few launches.

  Args:
    algorithm: ``"adam"``, ``"ademamix"``, ``"lion"``, ``"momentum"``,
      ``"rmsprop"`` or ``"adagrad"``.
    grads: float32, bfloat16 or float16 gradients, any shapes.
    moments: per gradient, one ``(codes, absmax)`` pair per moment of
      ``algorithm``, in the order of ``ALGORITHMS[algorithm].moments``:
      ``codes`` uint8 of the gradient's shape, ``absmax`` float32
      ``[ceil(size / block_size)]``.
    hyper: float32 ``[len(update8.HYPER_NAMES[algorithm])]``, may be traced.
    block_size: elements per quantization block, one of 64, 128, ..., 4096.
    impl: ``"triton"`` or ``"interpret"``.
    stochastic: per moment, whether it rounds stochastically
      (``update8.update_8bit_reference``); ``None``: none does.
    key: uint32 scalar, the step's noise offset (``update8.rounding_key``),
      needed when a moment rounds stochastically. The noise counters number
      the elements of ``grads`` one after the other, as the reference's
      ``counter_offset`` does leaf by leaf.

  Returns:
    Per gradient ``(direction, new_moments)``: ``direction`` of the
    gradient's shape and dtype, ``new_moments`` like its ``moments``. The
    codes and absmax are updated in place (``input_output_aliases``) when the
    caller donates them. Empty leaves launch nothing and keep their moments.
  """
  val.check_choice(algorithm, "algorithm", ALGORITHMS)
  val.check_choice(impl, "impl", ("triton", "interpret"))
  val.check_choice(block_size, "block_size", BLOCKSIZES)
  _check_hyper(algorithm, hyper)
  stochastic = update8.check_stochastic(algorithm, stochastic, key)
  key = jnp.zeros((1,), jnp.uint32) if key is None else (
      jnp.asarray(key, jnp.uint32).reshape(1))
  if len(grads) != len(moments):
    raise ValueError(f"got {len(grads)} grads but {len(moments)} moment tuples")
  for i, (grad, leaf_moments) in enumerate(zip(grads, moments)):
    val.check_float_array(grad, f"grads[{i}]")
    _check_moments(algorithm, grad, leaf_moments, block_size)
  results = [(jnp.zeros(g.shape, g.dtype), tuple((c, a) for c, a in m))
             for g, m in zip(grads, moments)]
  counters = np.cumsum([0] + [g.size for g in grads[:-1]]).tolist()
  for leaves in _launches(algorithm, grads):
    outs = _launch(algorithm, [grads[i] for i in leaves],
                   [moments[i] for i in leaves], hyper, block_size, impl,
                   [counters[i] for i in leaves], stochastic, key)
    for i, out in zip(leaves, outs):
      results[i] = out
  return results


def fused_update(algorithm: str, grad: jax.Array, moments: tuple[Moment, ...],
                 hyper: jax.Array, *, block_size: int,
                 impl: str) -> tuple[jax.Array, tuple[Moment, ...]]:
  r"""One fused 8-bit optimizer step for one leaf: :func:`fused_update_leaves`
  of ``[grad]``; returns its ``(direction, new_moments)``."""
  val.check_float_array(grad, "grad")
  return fused_update_leaves(algorithm, [grad], [moments], hyper,
                             block_size=block_size, impl=impl)[0]
