import time, torch, sys
torch.set_num_threads(int(sys.argv[1]))
from partinfer.common.formats.blocks import BLOCK_FORMATS
from partinfer.runtime.native import down_k
from partinfer.runtime.quant import columns_from_rows
from tests.test_compact_weights import random_k_blocks
fmt = BLOCK_FORMATS["Q6_K"]
rows = random_k_blocks(fmt, 1536, 8960)
codes, table = columns_from_rows(rows, fmt)
for ids in (torch.arange(8960), torch.arange(256)):
    c = codes[ids].contiguous(); a = torch.randn(1, ids.numel())
    for _ in range(3): down_k(c, table, ids, a, "q6_k")
    t = time.perf_counter(); n = 20
    for _ in range(n): down_k(c, table, ids, a, "q6_k")
    dt = (time.perf_counter() - t) / n
    print(ids.numel(), "ms", dt * 1e3, "ns per neuron-chunk", dt * 1e9 / (ids.numel() * 48))
