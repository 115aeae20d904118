"""numpy emulation of the register-table lookup and of gemv_mma_kernel's lanes.

Checks, without a GPU, the two pieces of ``gemv_candidate``'s tensor-core
gemv that are easy to get wrong: the ``prmt`` byte-permute lookup of a
word's 8 codes (the exact instruction sequence of ``_mma_lookup``, every
code in every nibble), and the mapping of a lane's words and ``x`` pairs
onto ``mma.m16n8k16``'s A/B fragments (the PTX ISA fragment layouts,
emulated lane by lane), against a float64 reference::

  python benchmarks/experiments/mma_lane_emulation.py
"""

import numpy as np

NF4 = np.float32([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])


def bf16_bits(v: np.ndarray) -> np.ndarray:
  """float32 -> bfloat16 bit patterns (round to nearest even)."""
  b = v.view(np.uint32).astype(np.uint64)
  return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint32)


def bf16_value(bits: int) -> float:
  return float(np.array([bits << 16], np.uint32).view(np.float32)[0])


def register_table(quant_map: np.ndarray) -> list[int]:
  """``gemv_candidate.register_table`` (one copy): low bytes of entries
  0-3, 4-7, 8-11, 12-15, then their high bytes, as little-endian words."""
  bits = bf16_bits(quant_map)
  def pack(column):
    return [int(sum(int(column[4 * j + i]) << (8 * i) for i in range(4)))
            for j in range(4)]
  return pack(bits & 0xFF) + pack(bits >> 8)


def prmt(a: int, b: int, c: int) -> int:
  """PTX ``prmt.b32`` (default mode): bytes of ``{b, a}`` picked by the 4
  selector nibbles of ``c``; a selector with bit 3 set replicates the sign
  bit of the picked byte."""
  source = ([(a >> (8 * i)) & 0xFF for i in range(4)]
            + [(b >> (8 * i)) & 0xFF for i in range(4)])
  out = 0
  for i in range(4):
    s = (c >> (4 * i)) & 0xF
    byte = source[s & 7]
    if s & 8:
      byte = 0xFF if byte & 0x80 else 0
    out |= byte << (8 * i)
  return out


def lookup_pairs(word: int, table: list[int]) -> list[int]:
  """``_mma_lookup``: a word's 8 codes -> 4 bfloat16 pairs (elements 0-1,
  2-3, 4-5, 6-7; element ``e`` is nibble ``e ^ 1``), low half first."""
  pairs = []
  for s in (word & 0xFFFFFFFF, word >> 16):
    s7 = s & 0x7777
    sel = ((s >> 1) & 0x4444) | 0x3210
    lo = prmt(prmt(table[0], table[1], s7), prmt(table[2], table[3], s7), sel)
    hi = prmt(prmt(table[4], table[5], s7), prmt(table[6], table[7], s7), sel)
    pairs += [prmt(lo, hi, 0x4051), prmt(lo, hi, 0x6273)]
  return pairs


def check_lookup() -> None:
  table = register_table(NF4)
  want = bf16_bits(NF4)
  rng = np.random.default_rng(0)
  words = [0, 0xFFFFFFFF, 0x76543210, 0xFEDCBA98]
  words += [int(w) for w in rng.integers(0, 2**32, 2000, dtype=np.uint64)]
  for word in words:
    pairs = lookup_pairs(word, table)
    for e in range(8):
      code = (word >> (4 * (e ^ 1))) & 15
      got = (pairs[e // 2] >> (16 * (e % 2))) & 0xFFFF
      assert got == want[code], (hex(word), e, hex(got), hex(want[code]))
  print("prmt lookup: ok")


def mma(a_frags: list[list[int]], b_frags: list[list[int]]) -> np.ndarray:
  """``mma.m16n8k16.row.col`` with bf16 inputs: ``D = A @ B``, 16 x 8, from
  the 32 lanes' fragments (lane ``4 g + t``: A regs (g, 2t), (g+8, 2t),
  (g, 2t+8), (g+8, 2t+8); B regs (k 2t, col g), (k 2t+8, col g))."""
  a, b = np.zeros((16, 16)), np.zeros((16, 8))
  for lane in range(32):
    g, t = lane // 4, lane % 4
    for reg, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t),
                                      (g, 2 * t + 8), (g + 8, 2 * t + 8))):
      value = a_frags[lane][reg]
      a[row, col:col + 2] = [bf16_value(value & 0xFFFF), bf16_value(value >> 16)]
    for reg, k in enumerate((2 * t, 2 * t + 8)):
      value = b_frags[lane][reg]
      b[k:k + 2, g] = [bf16_value(value & 0xFFFF), bf16_value(value >> 16)]
  return a @ b


def check_mma_lanes(k: int = 128) -> None:
  """One warp's 16 rows through ``gemv_mma_kernel``'s lane mapping."""
  rng = np.random.default_rng(0)
  n = 16
  packed = rng.integers(0, 256, n * k // 2, dtype=np.uint8)
  absmax = (rng.random((n, k // 64)) + 0.5).astype(np.float32)
  x = rng.standard_normal(k).astype(np.float32)
  table = register_table(NF4)
  words = packed.view(np.uint32).reshape(n, k // 8)
  x_bits = bf16_bits(x)
  x_pairs = x_bits[0::2] | (x_bits[1::2] << 16)
  codes = np.stack([packed >> 4, packed & 15], 1).reshape(n, k)
  weights = np.vectorize(bf16_value)(bf16_bits(NF4)[codes])
  ref = (weights * np.repeat(absmax, 64, axis=1)) @ np.vectorize(bf16_value)(x_bits)
  acc = np.zeros(n)
  for block in range(k // 64):
    d = np.zeros((16, 8))
    for pair in range(2):
      a0, a1, b0, b1 = [], [], [], []
      for lane in range(32):
        g, t = lane // 4, lane % 4
        col = block * 8 + 4 * pair + t
        pg = lookup_pairs(int(words[g, col]), table)
        ph = lookup_pairs(int(words[g + 8, col]), table)
        first = (block * 64 + 32 * pair + 8 * t) // 2
        xs = [int(v) for v in x_pairs[first:first + 4]]
        a0.append([pg[0], ph[0], pg[1], ph[1]])
        a1.append([pg[2], ph[2], pg[3], ph[3]])
        b0.append(xs[0:2])
        b1.append(xs[2:4])
      d += mma(a0, b0) + mma(a1, b1)
    assert np.allclose(d, d[:, :1]), "x is in every column: columns agree"
    acc += d[:, 0] * absmax[:, block]
  err = np.abs(acc - ref).max() / np.abs(ref).max()
  assert err < 1e-6, err
  print(f"mma lanes: ok (max relative error {err:.1e})")


if __name__ == "__main__":
  check_lookup()
  check_mma_lanes()
