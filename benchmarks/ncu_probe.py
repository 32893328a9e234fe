"""A few calls of one kvpack GPU kernel, for Nsight Compute (``ncu``) to profile one of them.

    ncu --clock-control none --kernel-name regex:_channel_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats python benchmarks/ncu_probe.py g128
    ncu ... --kernel-name regex:decode_int4 python benchmarks/ncu_probe.py int4 16384

``g128``: ``int8-channel-g128`` quantize of 131072 x 8192 float16 (the ``kvpack bench`` case);
``int4 [tokens]``: the int4 decode kernel, batch 8, 32 query / 8 KV heads, head dim 128.
"""

from __future__ import annotations

import sys

import torch

import kvpack
from kvpack.attention import decode
from kvpack.bench import attention as bench


def main() -> None:
    what = sys.argv[1]
    dev = torch.device("cuda")
    if what == "g128":
        x = torch.randn(131072, 8192, dtype=torch.float16, device=dev)
        for _ in range(4):
            kvpack.quantize(x, "int8-channel-g128", backend="triton")
    elif what == "int4":
        tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 16384
        layer = bench.filled_layer("int4", 8, 8, tokens, 128, dev)
        q = torch.randn(8, 32, 1, 128, dtype=torch.float16, device=dev)
        for _ in range(4):
            decode(q, layer)
    else:
        raise SystemExit(f"unknown probe {what!r}: g128 or int4")
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
