"""The kernels of tiled 4-bit weights, compiled for sm_90 on the CPU.

Triton's interpreter runs the tensor-core kernel's emulated path
(tests/test_ops_tiled4.py); the inline PTX of its compiled path (``prmt``
lookups, ``mma.sync``) only runs on a GPU. Compiling it for sm_90 with the
ptxas that Triton ships needs no GPU, and catches what the interpreter
cannot: asm operand counts, constraint strings, PTX syntax of both mma
variants, layouts the compiler cannot convert (the tiled dequantize's
6-D permutation).
"""

import os

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from jlowbit.triton_kernels import mma4  # noqa: E402
from jlowbit.triton_kernels import quant4  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1",
    reason="the kernel module was imported for the interpreter")


def _compile(kernel, signature, constexprs, num_warps):
  signature = {**signature, **dict.fromkeys(constexprs, "constexpr")}
  source = ASTSource(
      fn=kernel, signature=signature,
      constexprs={(kernel.arg_names.index(k),): v for k, v in constexprs.items()})
  return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=num_warps, num_stages=3))


@pytest.mark.parametrize("f16", [False, True], ids=["bf16", "f16"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("rows", [8, 16])
def test_compiled_kernel_builds_for_sm90(f16, nested, rows):
  kernel = mma4.matmul_4bit_tiled_kernel
  half = "*fp16" if f16 else "*bf16"
  signature = {"x_ptr": half, "packed_ptr": "*u8", "table_ptr": "*i32",
               "absmax_ptr": "*u8" if nested else "*fp32",
               "nested_code_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
               "offset_ptr": "*fp32", "M": "i32", "N": "i32",
               "y_ptr": "*fp32"}
  unroll = 2
  compiled = _compile(kernel, signature, dict(
      K=1024, BLOCK_SIZE=128, SPLIT_K=2, NUM_WARPS=2, UNROLL=unroll,
      ROWS=rows, NESTED=nested, NESTED_BLOCK=256, F16=f16), num_warps=2)
  ptx = compiled.asm["ptx"]
  mma = ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" if f16 else
         "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32")
  # 4 mmas per 64-column block and group of 8 rows, UNROLL blocks per step.
  assert ptx.count(mma) == 4 * unroll * rows // 8
  assert ptx.count("mma.sync") == 4 * unroll * rows // 8
  assert compiled.asm["cubin"]


@pytest.mark.parametrize("dtype", ["*bf16", "*fp32"])
def test_tiled_dequantize_builds_for_sm90(dtype):
  compiled = _compile(
      quant4.dequantize_4bit_tiled_kernel,
      {"packed_ptr": "*u8", "quant_map_ptr": "*fp32", "absmax_ptr": "*fp32",
       "out_ptr": dtype},
      dict(K=4096, BLOCK_SIZE=64, UNITS=8), num_warps=quant4.DEQUANTIZE_WARPS)
  assert compiled.asm["cubin"]
