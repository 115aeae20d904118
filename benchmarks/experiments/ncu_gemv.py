"""ncu probe of the batch-1 gemv kernel (8192 x 8192 NF4, block_n 4 and 2).

Run under Nsight Compute on the GPU machine::

  ncu --clock-control none --kernel-name gemv_4bit_kernel --section SpeedOfLight \
      --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
      python3 benchmarks/experiments/ncu_gemv.py
"""
import torch, triton
from jlowbit.triton_kernels import gemv4
n = k = 8192
lut = torch.randn(16, device="cuda")
packed = torch.randint(0, 256, (n * k // 2,), dtype=torch.uint8, device="cuda")
absmax = torch.rand(n * k // 64, device="cuda")
x = torch.randn(k, device="cuda", dtype=torch.bfloat16)
y = torch.empty((1, n), device="cuda", dtype=torch.bfloat16)
for bn in (4, 2):
  gemv4.gemv_4bit_kernel[(n // bn, 1)](x, packed, lut, absmax, absmax, absmax, absmax, n, y, K=k,
      BLOCK_SIZE=64, BLOCK_N=bn, BLOCK_K=1024, V=4, SPLIT_K=1, NESTED=False, NESTED_BLOCK=1,
      EVEN_N=True, num_warps=4)
torch.cuda.synchronize()
