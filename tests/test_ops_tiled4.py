"""The tiled 4-bit layout: byte-exact round trip to bitsandbytes' bytes, and
the tensor-core kernel that multiplies 1-16 rows by a tiled weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ALL_IMPLS, KERNEL_IMPLS

import jlowbit
from jlowbit import _tiling
from jlowbit import matmul4
from jlowbit import quant4

TRITON = [pytest.param("triton", id="triton", marks=pytest.mark.gpu)]
RTOL = {"float32": 3e-5, "bfloat16": 2.0**-7, "float16": 2.0**-10}


def _normal(shape, dtype="float32", seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32).astype(dtype)


def _weight(n, k, block_size=64, quant_type="nf4", nested=False, seed=1,
            layout="bnb"):
  return jlowbit.quantize_4bit(_normal((n, k), "bfloat16", seed),
                               block_size=block_size, quant_type=quant_type,
                               compress_statistics=nested, layout=layout,
                               impl="xla")


def _leaves(w4):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(w4)]


def _assert_close_to_dense(y, x, w4):
  """``y`` vs float64 ``x @ W^T``; error scaled by ``|ref| + sum |x||W|``."""
  w = np.asarray(jlowbit.dequantize_4bit(w4, jnp.float32, impl="xla"), np.float64)
  x = np.asarray(x, np.float64).reshape(-1, w.shape[1])
  ref = x @ w.T
  scale = np.abs(ref) + np.abs(x) @ np.abs(w).T
  got = np.asarray(y, np.float64).reshape(ref.shape)
  bound = RTOL[jnp.dtype(y.dtype).name] * scale + 1e-30
  assert np.all(np.abs(got - ref) <= bound), np.max(np.abs(got - ref) / bound)


# --- The layout ---

@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape, block_size", [
    ((16, 64), 64), ((48, 192), 64), ((32, 256), 128), ((32, 512), 512)],
    ids=str)
def test_round_trip_is_byte_exact(shape, block_size, quant_type, nested):
  w4 = _weight(*shape, block_size, quant_type, nested)
  tiled = jlowbit.tile_4bit(w4)
  assert tiled.layout == "tiled" and tiled.nested == nested
  assert [a.shape for a in _leaves(tiled)] == [a.shape for a in _leaves(w4)]
  back = jlowbit.untile_4bit(tiled)
  assert back.layout == "bnb"
  for got, want in zip(_leaves(back), _leaves(w4), strict=True):
    np.testing.assert_array_equal(got, want)
  # bitsandbytes' export of a tiled weight: the same entries, same bytes.
  for storage in ("uint8", "bfloat16"):
    want = jlowbit.to_bnb(w4.replace(quant_storage=storage), prefix="w")
    got = jlowbit.to_bnb(tiled.replace(quant_storage=storage), prefix="w")
    assert list(got) == list(want)
    for key in want:
      assert got[key].dtype == want[key].dtype
      np.testing.assert_array_equal(got[key], want[key])
  # Layout-preserving no-ops.
  assert jlowbit.tile_4bit(tiled) is tiled and jlowbit.untile_4bit(w4) is w4


def test_tiled_order_is_the_documented_map():
  n, k = 32, 256
  w4 = _weight(n, k, block_size=128)
  words = np.asarray(w4.packed).view(np.uint32).reshape(n, k // 8)
  tiled = np.asarray(jlowbit.tile_4bit(w4).packed).view(np.uint32)
  for r in range(n):
    h, g = divmod(r % 16, 8)
    for column_word in range(k // 8):
      b, rest = divmod(column_word, 8)
      j, t = divmod(rest, 4)
      index = ((r // 16 * (k // 64) + b) * 8 + g) * 16 + 4 * t + 2 * h + j
      assert tiled[index] == words[r, column_word]
  absmax = np.asarray(w4.absmax).reshape(n // 16, 16, k // 128)
  tiled_absmax = np.asarray(jlowbit.tile_4bit(w4).absmax).reshape(n // 16, k // 128, 16)
  np.testing.assert_array_equal(tiled_absmax, absmax.transpose(0, 2, 1))


@pytest.mark.parametrize("nested", [False, True])
def test_nested_second_level_stays_in_bnb_order(nested):
  w4 = _weight(32, 512, 64, nested=nested)  # 256 blocks: 1 nested block
  tiled = jlowbit.tile_4bit(w4)
  if nested:
    np.testing.assert_array_equal(tiled.absmax.absmax, w4.absmax.absmax)
    np.testing.assert_array_equal(tiled.offset, w4.offset)
  n, k = w4.shape
  np.testing.assert_array_equal(
      quant4.absmax_float32(tiled, impl="xla"),
      _tiling.tile_blocks(quant4.absmax_float32(w4, impl="xla"), n, k, 64))


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape, block_size", [
    ((32, 128), 64),     # 2 units of a tile per program
    ((32, 1024), 128),   # 8 units per program, 2 programs per tile
], ids=str)
def test_quantize_and_dequantize_tiled(impl, nested, shape, block_size):
  x = _normal(shape, "bfloat16", seed=3)
  w4 = jlowbit.quantize_4bit(x, block_size=block_size,
                             compress_statistics=nested, impl=impl)
  tiled = jlowbit.quantize_4bit(x, block_size=block_size,
                                compress_statistics=nested, layout="tiled",
                                impl=impl)
  for got, want in zip(_leaves(tiled), _leaves(jlowbit.tile_4bit(w4)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  for dtype in ("float32", "bfloat16"):
    np.testing.assert_array_equal(
        jlowbit.dequantize_4bit(tiled, dtype, impl=impl),
        jlowbit.dequantize_4bit(w4, dtype, impl=impl))


def test_from_bnb_then_tile_and_jit():
  w4 = _weight(48, 192, nested=True)
  loaded = jlowbit.from_bnb(jlowbit.to_bnb(w4))
  tiled = jax.jit(jlowbit.tile_4bit)(loaded)
  assert tiled.layout == "tiled"
  for got, want in zip(_leaves(tiled), _leaves(jlowbit.tile_4bit(w4)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  # The layout is static metadata: it survives tree maps and jit.
  assert jax.tree.map(lambda a: a, tiled).layout == "tiled"
  assert jax.jit(lambda w: w)(tiled).layout == "tiled"


@pytest.mark.parametrize("shape, block_size, match", [
    ((15, 64), 64, r"out_features a positive multiple of 16"),
    ((16, 96), 32, r"in_features a positive multiple of 64"),
    ((16, 64), 32, r"block_size=32 must be a multiple of 64"),
    ((16, 192), 128, r"block_size=128 must be a multiple of 64 that divides "
                     r"in_features=192"),
    ((2, 16, 64), 64, r"must be 2-D"),
], ids=str)
def test_untileable_weights_raise(shape, block_size, match):
  x = _normal(shape, "bfloat16")
  w4 = jlowbit.quantize_4bit(x, block_size=block_size, impl="xla")
  with pytest.raises(ValueError, match=r"tile_4bit: w4 cannot be tiled: .*" + match):
    jlowbit.tile_4bit(w4)
  with pytest.raises(ValueError, match=r"layout='tiled' does not fit x: .*" + match):
    jlowbit.quantize_4bit(x, block_size=block_size, layout="tiled", impl="xla")
  with pytest.raises(ValueError, match=r"layout='tiled' does not fit this weight"):
    w4.replace(layout="tiled")


def test_layout_errors():
  with pytest.raises(ValueError, match=r"layout='rows' is not supported; "
                     r"allowed values: 'bnb', 'tiled'"):
    jlowbit.quantize_4bit(jnp.ones((16, 64)), layout="rows")
  with pytest.raises(ValueError, match=r"layout='rows' is not supported"):
    _weight(16, 64).replace(layout="rows")
  with pytest.raises(TypeError, match=r"w4 must be a Quantized4bit"):
    jlowbit.tile_4bit(jnp.ones((16, 64)))


# --- The tensor-core kernel ---

@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("rows, n, k, block_size, quant_type, nested, dtype", [
    (1, 16, 64, 64, "nf4", False, "bfloat16"),
    (3, 48, 192, 64, "fp4", True, "float16"),
    (8, 32, 256, 128, "nf4", True, "bfloat16"),
    (9, 32, 128, 64, "fp4", False, "bfloat16"),    # two groups of 8 rows
    (16, 64, 128, 64, "nf4", True, "float16"),
], ids=str)
def test_tiled_matmul_matches_dense(impl, rows, n, k, block_size, quant_type,
                                    nested, dtype):
  w4 = _weight(n, k, block_size, quant_type, nested, layout="tiled")
  x = _normal((rows, k), dtype, seed=4)
  y = jlowbit.matmul_4bit(x, w4, impl=impl)
  assert y.shape == (rows, n) and y.dtype == jnp.dtype(dtype)
  # The table is rounded to x's dtype before the tensor-core product: one
  # more rounding than the dense reference, within the same bound.
  _assert_close_to_dense(y, x, w4)


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
@pytest.mark.parametrize("rows", [13, 20])
def test_tiled_kernel_two_programs_per_tile_agree(impl, rows):
  # 13 rows: one program of 16 (block_m=16) or two of 8; 20 rows (past
  # matmul_4bit's routing, the launcher itself): 16 + 4 or 8 + 8 + 4.
  from jlowbit.triton_kernels import mma4  # pylint: disable=g-import-not-at-top
  w4 = _weight(32, 256, 128, "fp4", nested=True, layout="tiled")
  x = _normal((rows, 256), "bfloat16", seed=9)
  statistics = w4.absmax
  nested = (statistics.code, statistics.absmax, w4.offset, statistics.block_size)
  ys = [mma4.matmul_4bit_tiled(
      x, w4.packed, w4.quant_map, statistics.codes, nested, 32, 128, impl,
      block_m=block_m, num_warps=1, num_stages=1, split_k=2, unroll=1)
        for block_m in (8, 16)]
  _assert_close_to_dense(ys[0], x, w4)
  np.testing.assert_array_equal(ys[0], ys[1])


@pytest.mark.parametrize("impl", KERNEL_IMPLS)
def test_tiled_matmul_split_k_and_warps(impl):
  w4 = _weight(64, 512, 128, "nf4", nested=True, layout="tiled")
  x = _normal((5, 512), "bfloat16", seed=5)
  whole = jlowbit.matmul_4bit(
      x, w4, impl=impl, config=jlowbit.TiledConfig(split_k=1, unroll=1))
  _assert_close_to_dense(whole, x, w4)
  # 4 warps a program, K in 4 ranges of 2 steps of 2 blocks; 16 warps and
  # 16 ranges are halved to what the shape allows (4 tiles, 8 blocks).
  for config in (jlowbit.TiledConfig(num_warps=4, split_k=4, unroll=2),
                 jlowbit.TiledConfig(num_warps=16, split_k=16, unroll=4)):
    split = jlowbit.matmul_4bit(x, w4, impl=impl, config=config)
    _assert_close_to_dense(split, x, w4)
    np.testing.assert_allclose(np.asarray(split, np.float32),
                               np.asarray(whole, np.float32), rtol=2**-6,
                               atol=2**-6)


@pytest.mark.parametrize("rows, dtype, kernel", [
    (1, "bfloat16", True), (16, "float16", True), (17, "bfloat16", False),
    (1, "float32", False), (4, "float32", False)], ids=str)
def test_tiled_routing(monkeypatch, rows, dtype, kernel):
  calls = []
  tiled_kernels = matmul4._tiled_kernels

  def counted():
    calls.append(1)
    return tiled_kernels()

  monkeypatch.setattr(matmul4, "_tiled_kernels", counted)
  w4 = _weight(16, 64, layout="tiled")
  x = _normal((rows, 64), dtype, seed=6)
  y = jlowbit.matmul_4bit(x, w4, impl="interpret")
  assert bool(calls) == kernel
  _assert_close_to_dense(y, x, w4)


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_tiled_gemv_and_grad(impl):
  w4 = _weight(32, 128, nested=True)
  tiled = jlowbit.tile_4bit(w4)
  x = _normal((128,), "bfloat16", seed=7)
  _assert_close_to_dense(jlowbit.gemv_4bit(x, tiled, impl=impl), x, w4)

  def loss(x, w):
    return jnp.sum(jlowbit.matmul_4bit(x, w, impl=impl) ** 2)

  # float32 rows: both layouts dequantize forward and backward.
  rows = _normal((2, 128), "float32", seed=8)
  np.testing.assert_allclose(jax.grad(loss)(rows, tiled),
                             jax.grad(loss)(rows, w4), rtol=1e-6)


def test_tiled_config_defaults_and_errors():
  assert jlowbit.TiledConfig() == jlowbit.TiledConfig(
      block_m=16, num_warps=1, split_k=8, unroll=2, num_stages=3)
  assert jlowbit.TiledConfig.get_default(8192).split_k == 16
  assert jlowbit.TiledConfig.get_default(28672).split_k == 8
  assert jlowbit.TiledConfig.get_default(4096).split_k == 16
  assert jlowbit.TiledConfig.get_default(131072).split_k == 1
  with pytest.raises(ValueError, match=r"unroll=3 must be a power of two"):
    jlowbit.TiledConfig(unroll=3)
  with pytest.raises(TypeError, match=r"split_k=2.0 must be an int"):
    jlowbit.TiledConfig(split_k=2.0)
  with pytest.raises(ValueError, match=r"num_stages=0 must be >= 1"):
    jlowbit.TiledConfig(num_stages=0)
  with pytest.raises(ValueError, match=r"block_m=32 must be 8 or 16"):
    jlowbit.TiledConfig(block_m=32)
  with pytest.raises(ValueError, match=r"block_m=4 must be a power of two >= 8"):
    jlowbit.TiledConfig(block_m=4)


@pytest.mark.parametrize("impl", TRITON)
@pytest.mark.parametrize("shape, block_size, nested", [
    ((4096, 4096), 64, False), ((11008, 4096), 64, True),
    ((4096, 11008), 128, False), ((8192, 8192), 64, True)], ids=str)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_tiled_matmul_large_gpu(impl, shape, block_size, nested, dtype,
                                quant_type):
  w4 = _weight(*shape, block_size, quant_type, nested, layout="tiled")
  for rows in (1, 4, 8, 13, 16):
    x = _normal((rows, shape[1]), dtype, seed=rows)
    _assert_close_to_dense(jlowbit.matmul_4bit(x, w4, impl=impl), x, w4)


def test_prefer_layout_tiles_what_fits():
  fits, narrow = _weight(16, 64), _weight(16, 32, block_size=32)
  assert quant4.prefer_layout(fits, "tiled").layout == "tiled"
  assert quant4.prefer_layout(narrow, "tiled") is narrow
  tiled = jlowbit.tile_4bit(fits)
  assert quant4.prefer_layout(tiled, "bnb").layout == "bnb"
  with pytest.raises(ValueError, match=r"layout='rows' is not supported"):
    quant4.prefer_layout(fits, "rows")
