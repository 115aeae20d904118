r"""Fused 8-bit optimizer updates: one kernel launch for many parameter leaves.

A kernel reads each leaf's gradient ``g`` and 8-bit moments (uint8 codes +
float32 per-block absmax), dequantizes them (``code[codes] * absmax``), does
the float32 update math of its algorithm, writes the *direction* in the
gradient's dtype (unless the caller computes it: ``write_direction``) and
requantizes every new moment blockwise in place (``absmax`` = max |moment|
per block, nearest code, ties to the lower index, or stochastic rounding,
exactly as :func:`jlowbit.update8.quantize_rows_reference`). Blocks run
along each leaf's last axis (:mod:`jlowbit._layout`).

A program owns ``TILE // BLOCK_SIZE`` whole quantization blocks of one
leaf: ``TILE`` consecutive elements of the flattened leaf when the block
size divides its rows (the common case), else of the leaf with every row
padded to whole blocks (the padding lanes masked), as one flat tile (reshaped to
``[blocks, BLOCK_SIZE]`` only for the per-block absmax, so the table gathers
keep a coalesced one-dimensional layout); lanes past the end are masked:
their moments are zeroed before the absmax and never stored. The tiles
that hold neither padding nor lanes past the end (all of a leaf whose
size ``TILE`` divides) run an unmasked copy of the tile body (``FULL``).

**The parameter step** (``apply``, :class:`ParameterStep`): the kernel
also reads each leaf's parameter and writes ``p - lr * (d + wd * p)``
(decoupled decay; coupled: the math takes ``g + wd * p``) in the
parameter's dtype, in place, instead of the direction; such launches take
tiles of :data:`APPLY_TILE_ELEMENTS`.

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
(never ``tl.constexpr``: new values never recompile), laid out and used as
:mod:`jlowbit.algorithms` describes: each algorithm's ``<name>_math`` here is
the ``@triton.jit`` twin of the ``jax.numpy`` math there (gradient clamp and moment saturation
included).

First moments use the signed dynamic codebook, second moments (``v``,
``nu``) the unsigned one. Both reach the kernels in one float32
``[2, 5, 256]`` array ``qmaps`` (:func:`qmaps`: per codebook the codes,
(code, gap) pairs and the sorted thresholds of two searches) and one uint8 array
of bucket entries (:func:`jlowbit._search.bucket_search_table`):
dequantization gathers the codebook from a copy in shared memory
(``tl.gather``); requantization compares ``threshold * absmax <= moment``
like the reference's decision tree, but starts from the bucket keyed by the
top 16 bits of ``moment / absmax``
(:func:`jlowbit.triton_kernels.common.scaled_bucket_bracket`): a byte
gather of the bucket's start, then one threshold gather per comparison (one
or two) instead of the tree's eight gathers, no division, the codes of the
reference, packed four to a word as the last comparison adds its 1
(:func:`jlowbit.triton_kernels.common.counted_codes`).

**Stochastic rounding.** Moments flagged ``stochastic`` (AdEMAMix's slow
EMA by default) round to one of their two bracketing codes: the bucketed
search finds the lower one, then
:func:`jlowbit.triton_kernels.common.stochastic_step` (one more 64-bit
gather, of the code and its gap) rounds with the low-discrepancy noise of
:func:`jlowbit._noise.quasi_uniform`: the element's counter (its
position among the step's 8-bit leaves, ``counters``) sets its phase, and the
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

import functools
import hashlib
import linecache
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl

from jlowbit import _noise
from jlowbit import _search
from jlowbit import algorithms
from jlowbit import codebooks
from jlowbit.triton_kernels import common
from jlowbit.triton_kernels.launch import cdiv, launch

TILE_ELEMENTS = 2048  # elements per program (more when a block is larger)
# ... when the kernel also writes the parameters (ParameterStep): faster
# there for every algorithm and dtype on an H200, 1-6% (benchmarks/RESULTS.md,
# optimizer run 11: 512M fp32 AdamW 2.37 -> 2.24 ms), not for the update.
APPLY_TILE_ELEMENTS = 1024
# A thread updates this many elements of a tile. 16 issues 12-18% fewer
# instructions per element than 8 (sm_90 SASS) but ran slower on an H200
# (benchmarks/RESULTS.md, optimizer run 8: 512M fp32 AdamW 1.71 vs 1.80 ms,
# AdEMAMix 3.28 vs 3.50, Lion 1.13 vs 1.21; within 3% either way for 16-bit
# Lion and momentum), and launches whose rows are padded to whole blocks
# spill at 16 (their lanes' int64 row divisions take 110-160 registers).
ELEMENTS_PER_THREAD = 8
VECTOR_CHUNK = 16  # launches whose leaf sizes it divides get vectorized I/O
CODE_BITS = 8
QMAP_ROWS = 5  # per codebook in qmaps(): codes, (code, gap) pairs, 2 searches
# Pointer arguments per launch: 8 bytes each within CUDA's 4 KiB of kernel
# parameters, with room for Triton's own.
MAX_KERNEL_POINTERS = 384
MOMENT_LIMIT = tl.constexpr(algorithms.MOMENT_LIMIT)
GRADIENT_LIMIT = tl.constexpr(algorithms.GRADIENT_LIMIT)


@triton.jit
def _clamped(g):
  """``jnp.clip(g, -GRADIENT_LIMIT, GRADIENT_LIMIT)`` (NaN stays NaN)."""
  g = tl.minimum(g, GRADIENT_LIMIT, propagate_nan=tl.PropagateNan.ALL)
  return tl.maximum(g, -GRADIENT_LIMIT, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _ema(old, new, beta):
  return beta * old + (1.0 - beta) * new


@triton.jit
def _sign(x):
  """``jnp.sign``: -1, +1, and ``x`` itself for +-0 and NaN (1.0 with
  ``x``'s sign bit: one select where two take four instructions)."""
  unit = (x.to(tl.uint32, bitcast=True) & 0x80000000) | 0x3F800000
  return tl.where(tl.abs(x) > 0, unit.to(tl.float32, bitcast=True), x)


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
  g = _clamped(g)
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
  g = _clamped(g)
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
  g = _clamped(g)
  v = decay * v + (1.0 - decay) * g * g
  return common.fast_divide(g, tl.sqrt(v) + eps), v


@triton.jit
def adagrad_math(g, v, hyper_ptr):
  eps = tl.load(hyper_ptr)
  g = _clamped(g)
  v = v + g * g
  return common.fast_divide(g, tl.sqrt(v) + eps), v


@triton.jit
def _leaf_tile(tile, rows, row_chunks, row_blocks, leaf_chunks,
               BLOCK_SIZE: tl.constexpr, CHUNK: tl.constexpr,
               TILE: tl.constexpr, ALIGNED: tl.constexpr, FULL: tl.constexpr):
  """Tile ``tile`` of a leaf of ``rows`` rows of ``n = row_chunks * CHUNK``
  elements (``leaf_chunks * CHUNK`` in all), each cut into ``row_blocks``
  blocks (the last one partial unless ``ALIGNED``): int64 element offsets
  ``[TILE]``, their mask, ``n``.

  Lane ``i`` is position ``tile * TILE + i`` of the leaf with every row
  padded to ``row_blocks * BLOCK_SIZE`` elements, so a tile holds whole
  blocks. ``ALIGNED`` (``BLOCK_SIZE`` divides ``n``): no padding, the
  offsets are the positions themselves; ``FULL`` (aligned, and the tile
  lies within the leaf): the mask is a constant that Triton folds away,
  unmasking the loads and stores. With ``CHUNK = 16`` Triton knows that
  the mask is constant over 16 lanes and vectorizes them.
  """
  n = row_chunks * CHUNK
  position = tile.to(tl.int64) * TILE + tl.arange(0, TILE)
  if FULL:
    return position, tl.full((TILE,), True, tl.int1), n
  if ALIGNED:
    return position, position < leaf_chunks * CHUNK, n
  padded = row_blocks * BLOCK_SIZE
  row = position // padded
  column = position - row * padded
  return row * n + column, (row < rows) & (column < n), n


@triton.jit
def _load_grad(g_ptr, offsets, mask):
  return tl.load(g_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _tile_blocks(tile, n_blocks, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
                 FULL: tl.constexpr):
  """Block indices ``[TILE // BLOCK_SIZE]`` of leaf tile ``tile`` (row-major
  over ``rows x row_blocks``, the absmax layout); their mask (constant for a
  ``FULL`` tile)."""
  block = tile * (TILE // BLOCK_SIZE) + tl.arange(0, TILE // BLOCK_SIZE)
  if FULL:
    return block, tl.full((TILE // BLOCK_SIZE,), True, tl.int1)
  return block, block < n_blocks


@triton.jit
def _load_moment(codes_ptr, absmax_ptr, code_ptr, tile, offsets, mask, n_blocks,
                 BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, FULL: tl.constexpr,
                 CODE_BITS: tl.constexpr):
  """Loads and dequantizes one moment tile (float32 ``[TILE]``; lanes off
  ``mask`` hold garbage, which :func:`_store_moment` and the stores drop).

  The codebook is gathered with ``tl.gather`` from a copy in shared memory
  (one 32-bit address and a shared load per element, no cache tags)."""
  codes = tl.load(codes_ptr + offsets, mask=mask, other=0).to(tl.int32)
  block, block_mask = _tile_blocks(tile, n_blocks, BLOCK_SIZE, TILE, FULL)
  absmax = tl.load(absmax_ptr + block, mask=block_mask, other=0.0)
  code = tl.load(code_ptr + tl.arange(0, 1 << CODE_BITS))
  return tl.gather(code, codes, 0) * common.broadcast_rows(
      absmax, TILE // BLOCK_SIZE, BLOCK_SIZE)


@triton.jit
def _store_moment(value, codes_ptr, absmax_ptr, search_ptr, buckets_ptr,
                  pairs_ptr, tile, offsets, mask, n_blocks, BLOCK_SIZE: tl.constexpr,
                  TILE: tl.constexpr, FULL: tl.constexpr, units,
                  CODE_BITS: tl.constexpr,
                  STEPS: tl.constexpr, STOCHASTIC: tl.constexpr,
                  SATURATE: tl.constexpr, SIGNED: tl.constexpr):
  """Requantizes one moment tile blockwise; stores its codes and absmax.

  ``search_ptr``, ``buckets_ptr``, ``STEPS``: the codebook's search for the
  nearest code, or with ``STOCHASTIC`` for the lower bracketing code, which
  then rounds stochastically through the (code, gap) pairs at ``pairs_ptr``
  with the noise ``units`` (:func:`_tile_noise`). With ``SATURATE`` the
  moment saturates at ``+-MOMENT_LIMIT`` first (``jlowbit.algorithms``; NaN
  stays NaN; an unsigned moment is never negative, so only its upper bound
  is applied). Lanes off ``mask`` are zeroed so they cannot raise a block's
  absmax.
  """
  if SATURATE:
    value = tl.minimum(value, MOMENT_LIMIT, propagate_nan=tl.PropagateNan.ALL)
    if SIGNED:
      value = tl.maximum(value, -MOMENT_LIMIT, propagate_nan=tl.PropagateNan.ALL)
  codes, absmax = common.quantize_flat_tile(
      tl.where(mask, value, 0.0), search_ptr, buckets_ptr, BLOCK_SIZE,
      TILE // BLOCK_SIZE, CODE_BITS, STEPS, pairs_ptr, units, STOCHASTIC)
  tl.store(codes_ptr + offsets, codes.to(tl.uint8), mask=mask)
  block, block_mask = _tile_blocks(tile, n_blocks, BLOCK_SIZE, TILE, FULL)
  tl.store(absmax_ptr + block, absmax, mask=block_mask)


@triton.jit
def _tile_noise(keys_ptr, key_at, offsets, mask, n, ROW_NOISE: tl.constexpr):
  """Rounding noise of a leaf tile (:func:`common.quasi_uniform_units`).

  Element ``(row, column)`` (its offset ``row * n + column``) draws with
  the counter ``column`` at the key ``keys[key_at + row]`` with
  ``ROW_NOISE`` (a shard whose rows lie apart in the global leaf), else with
  the counter ``offset`` at the key ``keys[key_at]``; a key is the step's
  Weyl offset plus ``PHASE_MULTIPLIER`` times the counter of the row's (the
  leaf's) first element, so both give the element's global counter."""
  if ROW_NOISE:
    row = offsets // n
    key = tl.load(keys_ptr + key_at + row, mask=mask, other=0)
    return common.quasi_uniform_units((offsets - row * n).to(tl.uint32), key)
  return common.quasi_uniform_units(offsets.to(tl.uint32),
                                    tl.load(keys_ptr + key_at))


@triton.jit
def _store_direction(d_ptr, d, offsets, mask):
  tl.store(d_ptr + offsets, d.to(d_ptr.dtype.element_ty), mask=mask)


class Leaf(NamedTuple):
  """Where a leaf lies in a launch's grid and how its tiles are cut."""
  first: int  # its first tile in the grid
  tiles: int
  full_tiles: int  # leading tiles without masked lanes (aligned leaves)
  rows: int
  row_chunks: int  # row length // CHUNK
  row_blocks: int  # blocks per row
  key_at: int  # index of its first noise key
  aligned: bool  # whether its rows are whole blocks
  row_noise: bool  # whether its noise is keyed per row
  decays: bool = False  # whether the parameter step decays it (``apply``)


Layout = tuple[Leaf, ...]


def _leaf_pointers(suffix: str, moments: int, direction: bool,
                   apply: bool = False) -> tuple[list[str], list[str]]:
  """Names of one leaf's (input, output) pointers: ``g``, ``p`` (the
  parameter, with ``apply``), ``c<j>``/``a<j>`` (codes/absmax of moment j),
  ``d`` (with ``direction``) or ``op`` (the new parameter, with ``apply``),
  ``oc<j>``/``oa<j>``, each + ``suffix``."""
  pairs = [f"{p}{j}{suffix}" for j in range(moments) for p in "ca"]
  outs = [f"d{suffix}"] if direction else []
  if apply:
    return [f"g{suffix}", f"p{suffix}", *pairs], [f"op{suffix}",
                                                 *("o" + p for p in pairs)]
  return [f"g{suffix}", *pairs], [*outs, *("o" + p for p in pairs)]


def _leaf_dispatch(layout: Layout, moments: int, direction: bool,
                   apply: str | None, lo: int, hi: int, indent: str) -> list[str]:
  """Nested ``if``\\ s calling the tile function on the leaf (of ``lo:hi``)
  that owns ``tile``: unmasked on its full tiles, masked on the others."""
  if hi - lo == 1:
    leaf = layout[lo]
    ins, outs = _leaf_pointers(f"_{lo}", moments, direction, apply is not None)
    decays = "" if apply is None else f", {leaf.decays}"
    call = lambda full: (
        f"_update_tile({', '.join(ins + outs)}, qmaps_ptr, buckets_ptr, "
        f"hyper_ptr, keys_ptr, tile - {leaf.first}, {leaf.rows}, "
        f"{leaf.row_chunks}, {leaf.row_blocks}, {leaf.rows * leaf.row_chunks}, "
        f"{leaf.rows * leaf.row_blocks}, {leaf.key_at}, BLOCK_SIZE, TILE, "
        f"CHUNK, CODE_BITS, {leaf.aligned}, {leaf.row_noise}, {full}{decays})")
    if leaf.full_tiles in (0, leaf.tiles):
      return [indent + call(leaf.full_tiles > 0)]
    return [f"{indent}if tile < {leaf.first + leaf.full_tiles}:",
            f"{indent}  {call(True)}", f"{indent}else:", f"{indent}  {call(False)}"]
  mid = (lo + hi) // 2
  return ([f"{indent}if tile < {layout[mid].first}:"]
          + _leaf_dispatch(layout, moments, direction, apply, lo, mid,
                           indent + "  ")
          + [f"{indent}else:"]
          + _leaf_dispatch(layout, moments, direction, apply, mid, hi,
                           indent + "  "))


_CONSTEXPRS = ("BLOCK_SIZE", "TILE", "CHUNK", "CODE_BITS")
APPLY_MODES = ("decoupled", "coupled")


def _parameter_step(algorithm: str, apply: str) -> tuple[list[str], list[str]]:
  """Tile-body lines of the parameter step (``apply``): before the math
  (load ``p``; coupled decay adds ``wd * p`` to the gradient) and after it
  (decoupled decay adds ``wd * p`` to the direction; store ``p - lr * d``).
  ``lr`` and ``wd`` follow the algorithm's hyperparameters in ``hyper``."""
  at = len(algorithms.ALGORITHMS[algorithm].hyper)
  before = ["param = _load_grad(p_ptr, offsets, mask)",
            f"learning_rate = tl.load(hyper_ptr + {at})",
            f"weight_decay = tl.load(hyper_ptr + {at + 1})"]
  after = []
  if apply == "coupled":
    before += ["if DECAYS:", "  grad = grad + weight_decay * param"]
  else:
    after += ["if DECAYS:", "  direction = direction + weight_decay * param"]
  after.append("_store_direction(op_ptr, param - learning_rate * direction, "
               "offsets, mask)")
  return before, after


def _kernel_source(algorithm: str, layout: Layout, stochastic: tuple[bool, ...],
                   direction: bool, apply: str | None = None) -> str:
  """Source of the tile function ``_update_tile`` and the kernel (which
  writes the direction if ``direction``, or with ``apply`` (one of
  :data:`APPLY_MODES`) the new parameters instead)."""
  alg = algorithms.ALGORITHMS[algorithm]
  signed, k = alg.signed, len(alg.signed)
  constexprs = [f"{c}: tl.constexpr" for c in _CONSTEXPRS]
  book = lambda j: 0 if signed[j] else 1  # codebook of moment j
  qmap = lambda j, row: f"qmaps_ptr + {(QMAP_ROWS * book(j) + row) << CODE_BITS}"
  search = lambda j: (  # thresholds, bucket entries, (code, gap) pairs
      f"{qmap(j, 3 + stochastic[j])}, "
      f"buckets_ptr + {(2 * book(j) + stochastic[j]) * _search.BUCKET_KEYS}, "
      f"{qmap(j, 1)}")
  steps = lambda j: _search_tables()[2][book(j)][stochastic[j]]
  moments = ", ".join(f"m{j}" for j in range(k))
  tile_args = "tile, offsets, mask, leaf_blocks, BLOCK_SIZE, TILE, FULL"
  ins, outs = _leaf_pointers("_ptr", k, direction, apply is not None)
  tile_flags = ("ALIGNED", "ROW_NOISE", "FULL") + (("DECAYS",) if apply else ())
  tile_params = [*ins, *outs, "qmaps_ptr", "buckets_ptr", "hyper_ptr", "keys_ptr",
                 "tile", "rows", "row_chunks", "row_blocks", "leaf_chunks",
                 "leaf_blocks", "key_at", *constexprs,
                 *(f"{c}: tl.constexpr" for c in tile_flags)]
  noise = (["units = _tile_noise(keys_ptr, key_at, offsets, mask, n, ROW_NOISE)"]
           if any(stochastic) else [])
  before, after = _parameter_step(algorithm, apply) if apply else ([], [])
  if direction:
    after = ["_store_direction(d_ptr, direction, offsets, mask)"]
  tile_body = [
      "offsets, mask, n = _leaf_tile(tile, rows, row_chunks, row_blocks, "
      "leaf_chunks, BLOCK_SIZE, CHUNK, TILE, ALIGNED, FULL)",
      "grad = _load_grad(g_ptr, offsets, mask)",
      *before,
      *(f"m{j} = _load_moment(c{j}_ptr, a{j}_ptr, {qmap(j, 0)}, {tile_args}, "
        "CODE_BITS)"
        for j in range(k)),
      f"direction, {moments} = {algorithm}_math(grad, {moments}, hyper_ptr)",
      *after,
      *noise,
      *(f"_store_moment(m{j}, oc{j}_ptr, oa{j}_ptr, {search(j)}, {tile_args}, "
        f"{'units' if stochastic[j] else 'None'}, CODE_BITS, {steps(j)}, "
        f"{stochastic[j]}, {alg.saturates}, {signed[j]})" for j in range(k)),
  ]
  ins, outs = zip(*(_leaf_pointers(f"_{i}", k, direction, apply is not None)
                    for i in range(len(layout))))
  params = [*sum(ins, []), "qmaps_ptr", "buckets_ptr", "hyper_ptr", "keys_ptr",
            *sum(outs, []), *constexprs]
  body = ["tile = tl.program_id(0)",
          *_leaf_dispatch(layout, k, direction, apply, 0, len(layout), "")]
  return (f"def _update_tile({', '.join(tile_params)}):\n"
          + "".join(f"  {line}\n" for line in tile_body)
          + f"\n\ndef {algorithm}_update_kernel({', '.join(params)}):\n"
          + "".join(f"  {line}\n" for line in body))


@functools.cache
def update_kernel(algorithm: str, layout: Layout, stochastic: tuple[bool, ...],
                  direction: bool, apply: str | None = None
                  ) -> triton.JITFunction:
  """The ``@triton.jit`` update kernel of ``algorithm`` over ``layout``.

  Arguments: per leaf ``g``, ``p`` (with ``apply``), ``(codes, absmax)``
  per moment; then ``qmaps``, ``buckets``, ``hyper``, ``keys`` (uint32, the
  rounding noise's keys: :func:`fused_update`, read only when a moment of
  ``stochastic`` is true); then per leaf the outputs ``d`` (if
  ``direction``) or the new ``p`` (with ``apply``), ``(codes, absmax)`` per
  moment; then the constexprs.
  The source is registered with :mod:`linecache` so that Triton (and its
  interpreter) can read it.
  """
  source = _kernel_source(algorithm, layout, stochastic, direction, apply)
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
    gaps = _search.code_gaps(code) * 2.0**-_noise.UNIFORM_BITS
    searches = [_search.code_search(code, floor) for floor in (False, True)]
    maps.append(np.concatenate([[code], np.stack([code, gaps], -1).reshape(2, -1),
                                [thresholds for thresholds, _, _ in searches]]))
    buckets.append([entries for _, entries, _ in searches])
    steps.append(tuple(s for _, _, s in searches))
  assert min(min(s) for s in steps) > 0, "the dynamic codebooks have bucketed searches"
  maps, buckets = np.asarray(maps, np.float32), np.asarray(buckets, np.uint8)
  maps.setflags(write=False)
  buckets.setflags(write=False)
  return maps, buckets, tuple(steps)


def qmaps() -> np.ndarray:
  """float32 ``[2, QMAP_ROWS, 256]``: [signed, unsigned] x [codebook, 256
  (code, gap) pairs (rows 1-2: ``code[i]`` and
  :func:`jlowbit._search.code_gaps` ``[i]`` times ``2**-24``, as the
  kernels draw noise in units of ``2**-24``), the sorted thresholds of the
  nearest-code search, those of the lower bracketing code's search (each
  NaN last: :func:`jlowbit._search.code_search`)]."""
  return _search_tables()[0]


def bucket_entries() -> np.ndarray:
  """uint8 ``[2, 2, BUCKET_KEYS]``: the bucket entries of [signed,
  unsigned] x [nearest-code search, lower-bracketing-code search]."""
  return _search_tables()[1]


Moment = tuple[jax.Array, jax.Array]


class ParameterStep(NamedTuple):
  """The parameter step a launch fuses into the update (:func:`fused_update`):
  per gradient its parameter ``p`` (float32, bfloat16 or float16, the
  gradient's shape) and whether it decays, and the decay's ``mode`` (one of
  :data:`APPLY_MODES`). The kernel writes ``p - lr * (d + wd * p)``
  (decoupled) or steps with ``g + wd * p`` (coupled) and writes ``p - lr *
  d``, in float32; ``lr`` and ``wd`` are the two entries of ``hyper`` after
  the algorithm's own."""
  params: Sequence[jax.Array]
  decays: Sequence[bool]
  mode: str


def _launches(algorithm: str, grads: Sequence[jax.Array],
              apply: bool = False) -> list[list[int]]:
  """Leaf indices per launch: non-empty leaves grouped by gradient dtype and
  by whether 16 divides their rows' length, at most MAX_KERNEL_POINTERS each."""
  per_leaf = 2 + apply + 4 * len(algorithms.ALGORITHMS[algorithm].moments)
  groups: dict[tuple, list[int]] = {}
  for i, grad in enumerate(grads):
    if grad.size:
      key = (jnp.dtype(grad.dtype), _row_length(grad) % VECTOR_CHUNK == 0)
      groups.setdefault(key, []).append(i)
  most = MAX_KERNEL_POINTERS // per_leaf
  return [leaves[i:i + most] for leaves in groups.values()
          for i in range(0, len(leaves), most)]


def _row_length(grad: jax.Array) -> int:
  return grad.shape[-1] if grad.ndim else 1


def _launch(algorithm: str, grads: Sequence[jax.Array],
            moments: Sequence[tuple[Moment, ...]], hyper: jax.Array,
            keys: jax.Array, key_at: Sequence[tuple[int, bool]],
            block_size: int, impl: str,
            stochastic: tuple[bool, ...], write_direction: bool,
            apply: ParameterStep | None
            ) -> list[tuple[jax.Array | None, tuple[Moment, ...]]]:
  """One kernel launch over non-empty leaves of one dtype (``apply``: their
  parameter step)."""
  alg = algorithms.ALGORITHMS[algorithm]
  tile = max(APPLY_TILE_ELEMENTS if apply else TILE_ELEMENTS, block_size)
  chunk = (VECTOR_CHUNK if all(_row_length(g) % VECTOR_CHUNK == 0 for g in grads)
           else 1)
  layout, first = [], 0
  decays = apply.decays if apply else (False,) * len(grads)
  for grad, (at, row_noise), decay in zip(grads, key_at, decays):
    n = _row_length(grad)
    rows, row_blocks = grad.size // n, cdiv(n, block_size)
    aligned = n == row_blocks * block_size
    tiles = cdiv(rows * row_blocks * block_size, tile)
    layout.append(Leaf(first, tiles, grad.size // tile if aligned else 0, rows,
                       n // chunk, row_blocks, at, aligned, row_noise,
                       bool(decay)))
    first += tiles
  args, out_shape, aliases = [], [], {}
  for i, (grad, leaf_moments) in enumerate(zip(grads, moments)):
    n = grad.size
    args.append(grad.reshape(-1))
    if apply:
      param = apply.params[i]
      aliases[len(args)] = len(out_shape)
      args.append(param.reshape(-1))
      out_shape.append(jax.ShapeDtypeStruct((n,), param.dtype))
    elif write_direction:
      out_shape.append(jax.ShapeDtypeStruct(
          (n,), alg.exact_direction_dtype or grad.dtype))
    for codes, absmax in leaf_moments:
      for array in (codes.reshape(-1), absmax.reshape(-1)):
        aliases[len(args)] = len(out_shape)
        args.append(array)
        out_shape.append(jax.ShapeDtypeStruct(array.shape, array.dtype))
  outs = launch(
      __name__, "update_kernel", *args, jnp.asarray(qmaps()),
      jnp.asarray(bucket_entries()), hyper, keys,
      kernel_args=(algorithm, tuple(layout), stochastic, write_direction,
                   apply.mode if apply else None),
      out_shape=out_shape,
      grid=(first,), impl=impl, input_output_aliases=aliases,
      num_warps=tile // (32 * ELEMENTS_PER_THREAD), BLOCK_SIZE=block_size,
      TILE=tile, CHUNK=chunk, CODE_BITS=CODE_BITS)
  per_leaf = 2 * len(alg.moments) + (write_direction or bool(apply))
  results = []
  for i, (grad, leaf_moments) in enumerate(zip(grads, moments)):
    flat = outs[i * per_leaf:(i + 1) * per_leaf]
    d = None
    if apply:
      d, *flat = flat
      d = d.reshape(grad.shape)
    elif write_direction:
      d, *flat = flat
      d = d.astype(grad.dtype).reshape(grad.shape)
    results.append((d, tuple(
        (flat[j].reshape(grad.shape),
         flat[j + 1].reshape(leaf_moments[j // 2][1].shape))
        for j in range(0, len(flat), 2))))
  return results


def fused_update(
    algorithm: str, grads: Sequence[jax.Array],
    moments: Sequence[tuple[Moment, ...]], hyper: jax.Array, keys: jax.Array,
    key_at: Sequence[tuple[int, bool]], *, block_size: int, impl: str,
    stochastic: tuple[bool, ...], write_direction: bool,
    apply: ParameterStep | None = None,
) -> list[tuple[jax.Array | None, tuple[Moment, ...]]]:
  r"""Launches the fused 8-bit optimizer step of many leaves (few launches).

  The arguments are not validated here: :func:`jlowbit.update8.update_8bit`
  does that and chooses ``write_direction``.

  Args:
    algorithm: a key of :data:`jlowbit.algorithms.ALGORITHMS`.
    grads: float32, bfloat16 or float16 gradients, at least 1-D.
    moments: per gradient, one ``(codes, absmax)`` pair per moment of
      ``algorithm``: ``codes`` uint8 of the gradient's shape, ``absmax``
      float32 ``shape[:-1] + (ceil(shape[-1] / block_size),)`` (blocks
      along the last axis, :mod:`jlowbit._layout`).
    hyper: float32 vector in the algorithm's ``hyper`` layout, may be traced.
    keys: uint32 noise keys, read when a moment rounds stochastically: a
      key is the step's offset (:func:`jlowbit._noise.weyl_offset`) plus
      ``PHASE_MULTIPLIER`` times the noise counter of a leaf's (or a row's)
      first element.
    key_at: per gradient ``(index of its first key, per_row)``: one key for
      the leaf (its elements' counters run on row-major) or, with
      ``per_row``, one per row (a shard whose rows lie apart in the global
      leaf).
    block_size: elements per quantization block.
    impl: ``"triton"`` or ``"interpret"``.
    stochastic: per moment, whether it rounds stochastically.
    write_direction: whether the kernel writes the update direction.
    apply: the parameter step to fuse, or ``None``; then ``hyper`` holds
      ``lr`` and ``wd`` after the algorithm's entries and the kernel writes
      the new parameters instead of a direction.

  Returns:
    Per gradient ``(direction, new_moments)``: ``direction`` of the
    gradient's shape and dtype (``None`` when not written or for an empty
    gradient; with ``apply`` the new parameter instead), ``new_moments``
    like its ``moments``. The codes and absmax (and with ``apply`` the
    parameters) are updated in place (``input_output_aliases``) when the
    caller donates them. Empty gradients launch nothing and keep their
    moments (and parameters).
  """
  results = [(apply.params[i] if apply else None, tuple(m))
             for i, m in enumerate(moments)]
  for leaves in _launches(algorithm, grads, apply is not None):
    outs = _launch(algorithm, [grads[i] for i in leaves],
                   [moments[i] for i in leaves], hyper, keys,
                   [key_at[i] for i in leaves], block_size, impl, stochastic,
                   write_direction and apply is None,
                   apply and ParameterStep([apply.params[i] for i in leaves],
                                           [apply.decays[i] for i in leaves],
                                           apply.mode))
    for i, out in zip(leaves, outs):
      results[i] = out
  return results
