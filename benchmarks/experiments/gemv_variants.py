"""Kernel-level experiment: 4-bit gemv designs timed with torch + Triton alone.

Separates the kernel from the JAX launch path: each variant is a plain
``@triton.jit`` kernel launched on torch tensors and timed with
``triton.testing.do_bench`` (CUDA events, L2 flushed before every run,
median), next to cuBLAS dense bf16 and bitsandbytes' NF4 gemv in the same
process. Weights: random NF4 codes (uniform bytes), random positive absmax,
block_size 64, bf16 ``x``. Each variant is checked against a float32 torch
reference (max |y - ref| / max |ref| < 1e-2).

Run on the GPU machine from the repository root::

  python benchmarks/experiments/gemv_variants.py [--json OUT] [--quick]

Variant ``bcast``: the candidate kernel of ``gemv_candidate.py`` (``x``
loaded with the tile's shape), same configs, bf16 ``x``.

Variant ``prmt``: ``gemv_candidate.gemv_bcast_kernel`` with ``PRMT=True``,
the table in registers (``prmt`` lookups, no shared memory).

Variant ``dot``: ``gemv_candidate.matmul_dot_kernel`` (``prmt`` lookups to
bfloat16, ``tl.dot`` with ``x`` padded to 16 rows), also at 4 and 16 rows.

Variants ``rows gather`` / ``rows prmt``: ``gemv_candidate.gemv_rows_kernel``
(a thread owns one chunk of 2 or 4 rows, so ``x`` is loaded once per step
for all of them), table gathered or in registers.

Variant ``mma``: ``gemv_candidate.gemv_mma_kernel`` (``prmt`` lookups into
``mma.sync`` operand registers, a warp per 16 rows), warps x split K.

Variants ``stream mma`` / ``stream wide``:
``gemv_candidate.stream_rows_kernel``, the loads of ``mma`` (or 16-byte
loads of 64 contiguous bytes per row) with trivial arithmetic: the
bandwidth of the access pattern alone.

Variants ``mma tiled`` / ``stream tiled``:
``gemv_candidate.gemv_mma_tiled_kernel`` on ``W`` repacked by
``gemv_candidate.repack_tiled`` (each warp load 512 contiguous bytes), with
the mmas or with trivial arithmetic; ``mma tiled m4`` / ``m8``:
``gemv_candidate.matmul_mma_tiled_kernel``, 4 or 8 rows of ``x`` in B's
columns (the cost of one gemv).

Variant ``flat``: ``gemv_candidate.stream_flat_kernel``, the same number of
bytes read as one flat buffer with 1-8 independent 16-byte loads per thread
per iteration (the read ceiling at that size), and ``torch sum`` over it.

Variant ``words``: ``jlowbit.triton_kernels.gemv4.gemv_4bit_kernel`` (int32
words, codes unpacked in registers, the 16-entry table gathered with
``tl.gather``) over a grid of tile configs, ``x`` passed as bf16 or as a
float32 copy (``x<dtype>``), split K 1/2/4 (partial sums added by torch).
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import triton
import triton.language as tl

from jlowbit.triton_kernels import gemv4
import gemv_candidate  # noqa: E402  pylint: disable=g-bad-import-order,g-import-not-at-top
from jlowbit.triton_kernels import quant4

NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
       0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
       0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
       0.7229568362236023, 1.0]
SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192),
          (14336, 4096), (4096, 14336), (1024, 4096)]
BLOCK_SIZE = 64


@triton.jit
def dequantize_words(packed_ptr, lut_ptr, absmax_ptr, out_ptr,
                     BLOCK_SIZE: tl.constexpr, CHUNKS: tl.constexpr,
                     V: tl.constexpr):
  """Full tiles only: ``CHUNKS`` chunks of ``8 V`` elements per program."""
  chunk = tl.program_id(0).to(tl.int64) * CHUNKS + tl.arange(0, CHUNKS)
  words = tl.load(packed_ptr.to(tl.pointer_type(tl.int32)) + chunk[:, None] * V
                  + tl.arange(0, V)[None, :])
  absmax = tl.load(absmax_ptr + chunk * (8 * V) // BLOCK_SIZE)
  lut = tl.load(lut_ptr + tl.arange(0, 16))
  codes = tl.reshape(gemv4._word_codes(words), (CHUNKS * 8 * V,))
  values = tl.reshape(tl.gather(lut, codes, 0), (CHUNKS, 8 * V)) * absmax[:, None]
  tl.store(out_ptr + chunk[:, None] * (8 * V) + tl.arange(0, 8 * V)[None, :],
           values.to(out_ptr.dtype.element_ty))


def dequant_rows(quick: bool) -> list[dict]:
  """256M-element NF4 dequantize: shipped kernel, word kernel, bitsandbytes."""
  n = 256 << 20
  lut = torch.tensor(NF4, device="cuda")
  packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, device="cuda")
  absmax = torch.rand(n // BLOCK_SIZE, device="cuda") + 0.5
  rows = []
  for dtype in (torch.float32, torch.bfloat16):
    out = torch.empty(n, device="cuda", dtype=dtype)
    nbytes = n // 2 + 4 * n // BLOCK_SIZE + n * out.element_size()
    def record(variant, config, fn):
      us = _bench(fn)
      row = dict(shape="256M", variant=variant, config=config, dtype=str(dtype),
                 us=us, TBps=nbytes / us / 1e6, err=None)
      rows.append(row)
      print(json.dumps(row), flush=True)
    record("dequant shipped", "", lambda: quant4.dequantize_4bit_kernel[
        (n // quant4.TILE,)](packed, lut, absmax, n, out, BLOCK_SIZE=BLOCK_SIZE,
                             BLOCKS=quant4.TILE // BLOCK_SIZE,
                             num_warps=quant4.DEQUANTIZE_WARPS))
    ref = out.clone()
    for chunks, warps in itertools.product((128, 256, 512, 1024), (4, 8)):
      if quick and chunks == 1024:
        continue
      record("dequant words", f"c{chunks} w{warps}",
             lambda chunks=chunks, warps=warps: dequantize_words[
                 (n // (32 * chunks),)](packed, lut, absmax, out,
                                        BLOCK_SIZE=BLOCK_SIZE, CHUNKS=chunks,
                                        V=4, num_warps=warps))
      assert torch.equal(out, ref), "dequantize_words disagrees"
    try:
      import bitsandbytes.functional as F  # pylint: disable=g-import-not-at-top
      wb = torch.randn(n, device="cuda", dtype=dtype)
      qw, state = F.quantize_4bit(wb, blocksize=64, quant_type="nf4")
      del wb
      record("dequant bnb", "", lambda: F.dequantize_4bit(qw, state))
    except Exception as e:  # pylint: disable=broad-except
      print("bnb unavailable:", repr(e)[:200])
  return rows


def _bench(fn) -> float:
  return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


def run(shapes, quick: bool, variants) -> list[dict]:
  torch.manual_seed(0)
  lut = torch.tensor(NF4, device="cuda")
  table = gemv_candidate.register_table(lut)
  rows = []
  for n, k in shapes:
    packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device="cuda")
    absmax = torch.rand(n * k // BLOCK_SIZE, device="cuda") + 0.5
    x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
    codes = torch.stack([packed >> 4, packed & 15], 1).reshape(n, k).long()
    w = lut[codes] * absmax.repeat_interleave(BLOCK_SIZE).reshape(n, k)
    ref = (w @ x.float()).float()
    nbytes = n * k // 2 + 4 * n * k // BLOCK_SIZE
    wd = w.to(torch.bfloat16)
    del w, codes
    base = dict(shape=f"{n}x{k}", bytes=nbytes)

    def record(variant, config, fn, out=None, nb=nbytes):
      try:
        us = _bench(fn)
      except Exception as e:  # pylint: disable=broad-except
        print(f"{variant} {config} failed: {e!r}"[:2000], flush=True)
        return
      err = None
      if out is not None:
        fn()
        err = float((out().float() - ref).abs().max() / ref.abs().max())
      row = dict(base, variant=variant, config=config, us=us,
                 TBps=nb / us / 1e6, err=err)
      rows.append(row)
      print(json.dumps(row), flush=True)

    record("cublas bf16", "", lambda: torch.mv(wd, x), nb=2 * n * k)
    del wd
    try:
      import bitsandbytes as bnb  # pylint: disable=g-import-not-at-top
      import bitsandbytes.functional as F  # pylint: disable=g-import-not-at-top
      wb = (torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02)
      qw, state = F.quantize_4bit(wb, blocksize=64, quant_type="nf4")
      del wb
      xb = x[None, :]
      record("bnb nf4", "", lambda: bnb.matmul_4bit(xb, qw.t(), quant_state=state))
      del qw, state
    except Exception as e:  # pylint: disable=broad-except
      print("bnb unavailable:", repr(e)[:200])

    xf = x.float()
    for split_k in (1, 2, 4):
      if k % (split_k * 1024):
        continue
      y = torch.empty((split_k, n), device="cuda",
                      dtype=torch.bfloat16 if split_k == 1 else torch.float32)
      out = (lambda y=y: y.sum(0))
      for bn, bk, warps, xdt, v in itertools.product(
          (2, 4, 8, 16, 32), (256, 512, 1024), (4, 8), ("bf16", "f32"), (4, 8)):
        if bn * bk > 16384 or bn * bk < 1024 or (split_k > 1 and (bn > 8 or n > 12000)):
          continue
        if quick and (xdt == "f32" or bn > 8 or split_k > 2):
          continue
        xin = x if xdt == "bf16" else xf
        def launch(bn=bn, bk=bk, warps=warps, y=y, split_k=split_k, xin=xin,
                   v=v):
          gemv4.gemv_4bit_kernel[(triton.cdiv(n, bn), split_k)](
              xin, packed, lut, absmax, absmax, absmax, absmax, n, y, K=k,
              BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=bn, BLOCK_K=bk, V=v,
              SPLIT_K=split_k, NESTED=False, NESTED_BLOCK=1,
              EVEN_N=n % bn == 0, num_warps=warps)
          if split_k > 1:
            return y.sum(0)
          return y
        if "words" in variants and not (quick and (warps == 8 or split_k > 1)):
          record("words", f"n{bn} k{bk} v{v} w{warps} s{split_k} x{xdt}",
                 launch, out)
        if v != 4 or xdt != "bf16":
          continue
        for name, use_prmt, table_arg in (("bcast", False, lut),
                                          ("prmt", True, table)):
          if name not in variants:
            continue
          def launch_candidate(bn=bn, bk=bk, warps=warps, y=y,
                               split_k=split_k, use_prmt=use_prmt,
                               table_arg=table_arg):
            gemv_candidate.gemv_bcast_kernel[(triton.cdiv(n, bn), split_k)](
                x, packed, table_arg, absmax, absmax, absmax, absmax, n, y,
                K=k, BLOCK_SIZE=BLOCK_SIZE, BLOCK_N=bn, BLOCK_K=bk,
                SPLIT_K=split_k, NESTED=False, NESTED_BLOCK=1,
                EVEN_N=n % bn == 0, PRMT=use_prmt, num_warps=warps)
            if split_k > 1:
              return y.sum(0)
            return y
          record(name, f"n{bn} k{bk} w{warps} s{split_k}", launch_candidate,
                 out)
    if "mma" in variants:
      for warps, split_k, blocks in itertools.product((1, 4), (4, 8, 16),
                                                      (1, 2)):
        if n % (16 * warps) or k % (64 * blocks * split_k):
          continue
        ym = torch.empty((split_k, n), device="cuda",
                         dtype=torch.bfloat16 if split_k == 1 else torch.float32)
        def launch_mma(warps=warps, split_k=split_k, blocks=blocks, ym=ym):
          gemv_candidate.gemv_mma_kernel[(n // (16 * warps), split_k)](
              x, packed, table, absmax, n, ym, K=k, SPLIT_K=split_k,
              NUM_WARPS=warps, BLOCKS=blocks, num_warps=warps)
          return ym.sum(0) if split_k > 1 else ym[0]
        record("mma", f"w{warps} s{split_k} b{blocks}", launch_mma, launch_mma)
    if "tiled" in variants:
      tiled, tiled_absmax = gemv_candidate.repack_tiled(packed, absmax, n, k)
      for warps, split_k, stream, unroll in itertools.product(
          (1,), (4, 8, 16), (False, True), (1, 2, 4)):
        if n % (16 * warps) or k % (64 * split_k * unroll):
          continue
        yt = torch.empty((split_k, n), device="cuda",
                         dtype=torch.bfloat16 if split_k == 1 else torch.float32)
        def launch_tiled(warps=warps, split_k=split_k, stream=stream, yt=yt,
                         unroll=unroll):
          gemv_candidate.gemv_mma_tiled_kernel[(n // (16 * warps), split_k)](
              x, tiled, table, tiled_absmax, n, yt, K=k, SPLIT_K=split_k,
              NUM_WARPS=warps, STREAM=stream, UNROLL=unroll, num_warps=warps)
          return yt.sum(0) if split_k > 1 else yt[0]
        record("stream tiled" if stream else "mma tiled",
               f"w{warps} s{split_k} u{unroll}",
               launch_tiled, None if stream else launch_tiled)
      wf = (lut[torch.stack([packed >> 4, packed & 15], 1).reshape(n, k).long()]
            * absmax.repeat_interleave(BLOCK_SIZE).reshape(n, k))
      for m in (4, 8):
        xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        refm = xm.float() @ wf.t()
        for warps, split_k, unroll in itertools.product((1,), (4, 8, 16), (1, 2, 4)):
          if n % (16 * warps) or k % (64 * split_k * unroll):
            continue
          ym = torch.empty((split_k, m, n), device="cuda", dtype=torch.float32)
          def launch_small(warps=warps, split_k=split_k, xm=xm, ym=ym, m=m,
                           unroll=unroll):
            gemv_candidate.matmul_mma_tiled_kernel[(n // (16 * warps), split_k)](
                xm, tiled, table, tiled_absmax, m, n, ym, K=k, SPLIT_K=split_k,
                NUM_WARPS=warps, UNROLL=unroll, num_warps=warps)
            return ym.sum(0)
          try:
            us = _bench(launch_small)
          except Exception as e:  # pylint: disable=broad-except
            print(f"mma tiled m{m} failed: {e!r}"[:2000], flush=True)
            continue
          err = float((launch_small() - refm).abs().max() / refm.abs().max())
          row = dict(base, variant=f"mma tiled m{m}",
                     config=f"w{warps} s{split_k} u{unroll}",
                     us=us, TBps=nbytes / us / 1e6, err=err)
          rows.append(row)
          print(json.dumps(row), flush=True)
      del tiled, tiled_absmax, wf
    if "stream" in variants:
      for warps, split_k, wide in itertools.product((1, 4), (4, 8, 16),
                                                    (False, True)):
        if n % (16 * warps) or k % (128 * split_k):
          continue
        ys = torch.empty((split_k, n), device="cuda", dtype=torch.float32)
        def launch_stream(warps=warps, split_k=split_k, wide=wide, ys=ys):
          gemv_candidate.stream_rows_kernel[(n // (16 * warps), split_k)](
              x, packed, absmax, n, ys, K=k, SPLIT_K=split_k,
              NUM_WARPS=warps, WIDE=wide, num_warps=warps)
        record("stream wide" if wide else "stream mma", f"w{warps} s{split_k}",
               launch_stream)
    if "flat" in variants:
      # The same bytes read as one flat buffer (no rows, no x): the size's
      # own ceiling. ``torch sum`` is a vendor reduction over them.
      flat = torch.randint(-2**31, 2**31 - 1, (nbytes // 4,), dtype=torch.int32,
                           device="cuda")
      record("torch sum", "", lambda: flat.view(torch.float32).sum())
      for warps, loads, loops in itertools.product((4, 8), (1, 2, 4, 8),
                                                   (1, 4, 16)):
        tile = loads * 128 * warps
        grid = flat.numel() // (tile * loops)
        yf = torch.empty(grid * 32 * warps, device="cuda", dtype=torch.int32)
        def launch_flat(warps=warps, loads=loads, loops=loops, grid=grid,
                        yf=yf):
          gemv_candidate.stream_flat_kernel[(grid,)](
              flat, yf, LOOPS=loops, LOADS=loads, NUM_WARPS=warps,
              num_warps=warps)
        record("stream flat", f"w{warps} l{loads} x{loops} g{grid}",
               launch_flat, nb=grid * tile * loops * 4)
      del flat
    if "rows" in variants:
      for bk, warps, nrows, use_prmt in itertools.product(
          (1024, 2048, 4096), (1, 2, 4), (2, 4), (False, True)):
        if k % bk or bk // 32 < 32 * warps or n % nrows:
          continue
        y1 = torch.empty(n, device="cuda", dtype=torch.bfloat16)
        def launch_rows(bk=bk, warps=warps, nrows=nrows, use_prmt=use_prmt,
                        y1=y1):
          gemv_candidate.gemv_rows_kernel[(n // nrows,)](
              x, packed, table if use_prmt else lut, absmax, n, y1, K=k,
              BLOCK_SIZE=BLOCK_SIZE, BLOCK_K=bk, ROWS=nrows, PRMT=use_prmt,
              num_warps=warps)
          return y1
        record("rows prmt" if use_prmt else "rows gather",
               f"k{bk} w{warps} r{nrows}", launch_rows, launch_rows)
    if "dot" in variants:
      for bn, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 3)):
        y1 = torch.empty((1, n), device="cuda", dtype=torch.bfloat16)
        def launch_dot(bn=bn, warps=warps, stages=stages, y1=y1):
          gemv_candidate.matmul_dot_kernel[(triton.cdiv(n, bn),)](
              x, packed, table, absmax, 1, n, y1, K=k, BLOCK_SIZE=BLOCK_SIZE,
              BLOCK_M=16, BLOCK_N=bn, EVEN_N=n % bn == 0, num_warps=warps,
              num_stages=stages)
          return y1[0]
        record("dot", f"n{bn} w{warps} st{stages}", launch_dot, launch_dot)
    for m in (4, 16) if "small" in variants else ():
      xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
      wd = (lut[torch.stack([packed >> 4, packed & 15], 1).reshape(n, k).long()]
            * absmax.repeat_interleave(BLOCK_SIZE).reshape(n, k)).to(torch.bfloat16)
      refm = (xm.float() @ wd.float().t())
      record(f"cublas bf16 m{m}", "", lambda xm=xm, wd=wd: xm @ wd.t(), nb=2 * n * k)
      del wd
      ym = torch.empty((m, n), device="cuda", dtype=torch.bfloat16)
      for bn, bk, warps in itertools.product((32, 64, 128), (128, 256), (4, 8)):
        if quick and warps == 8 and bn < 64:
          continue
        def launch(bn=bn, bk=bk, warps=warps, xm=xm, ym=ym, m=m):
          gemv4.matmul_4bit_small_kernel[(triton.cdiv(n, bn), 1)](
              xm, packed, lut, absmax, absmax, absmax, absmax, m, n, ym, K=k,
              BLOCK_SIZE=BLOCK_SIZE, BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk, V=4,
              NESTED=False, NESTED_BLOCK=1, EVEN_N=n % bn == 0,
              num_warps=warps)
          return ym
        us = _bench(launch)
        launch()
        err = float((ym.float() - refm).abs().max() / refm.abs().max())
        row = dict(base, variant=f"small m{m}", config=f"n{bn} k{bk} w{warps}",
                   us=us, TBps=nbytes / us / 1e6, err=err)
        rows.append(row)
        print(json.dumps(row), flush=True)
      if "dot" not in variants:
        continue
      for bn, warps, stages in itertools.product((32, 64, 128), (4, 8), (1, 3)):
        def launch_dot(bn=bn, warps=warps, stages=stages, xm=xm, ym=ym, m=m):
          gemv_candidate.matmul_dot_kernel[(triton.cdiv(n, bn),)](
              xm, packed, table, absmax, m, n, ym, K=k, BLOCK_SIZE=BLOCK_SIZE,
              BLOCK_M=16, BLOCK_N=bn, EVEN_N=n % bn == 0, num_warps=warps,
              num_stages=stages)
          return ym
        try:
          us = _bench(launch_dot)
        except Exception as e:  # pylint: disable=broad-except
          print(f"dot m{m} failed: {e!r}"[:2000], flush=True)
          continue
        launch_dot()
        err = float((ym.float() - refm).abs().max() / refm.abs().max())
        row = dict(base, variant=f"dot m{m}", config=f"n{bn} w{warps} st{stages}",
                   us=us, TBps=nbytes / us / 1e6, err=err)
        rows.append(row)
        print(json.dumps(row), flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--json")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--shapes", nargs="*")
  parser.add_argument("--dequant", action="store_true")
  parser.add_argument("--variants", nargs="*",
                      default=["words", "bcast", "prmt", "rows", "dot", "mma", "tiled",
                               "stream", "small", "flat"],
                      help="of words, bcast, prmt, rows, dot, mma, tiled, stream, "
                      "small, flat")
  args = parser.parse_args()
  shapes = ([tuple(map(int, s.split("x"))) for s in args.shapes]
            if args.shapes is not None else SHAPES)
  rows = run(shapes, args.quick, set(args.variants)) if shapes else []
  if args.dequant:
    rows += dequant_rows(args.quick)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)
  print("\nbest per shape and variant:")
  for shape in dict.fromkeys(r["shape"] for r in rows):
    for variant in dict.fromkeys(r["variant"] for r in rows):
      cands = [r for r in rows if r["shape"] == shape and r["variant"] == variant
               and (r["err"] is None or r["err"] < 1e-2)]
      if cands:
        best = min(cands, key=lambda r: r["us"])
        print(f"{shape:>11} {variant:>12} {best['config']:>22} "
              f"{best['us']:8.1f} us {best['TBps']:5.2f} TB/s")


if __name__ == "__main__":
  main()
