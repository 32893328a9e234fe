"""The codes pass of a per-channel int8 quantize (131072 x 8192 float32, scales given): kvpack's
``_encode_kernel`` and torch.compile's pointwise kernel of the reference, once each, for Nsight Compute:

    ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section LaunchStats --section Occupancy -k regex:"_encode_kernel|triton_poi" \\
        python benchmarks/ncu_codes_pass.py
"""

from __future__ import annotations

import torch

from kvpack import reference
from kvpack.schemes import parse
from kvpack.triton import quant


def main() -> None:
    scheme = parse("int8-channel")
    x = torch.randn(1, 131072, 8192, device="cuda")
    scale, zero = quant.compute_scales(x, scheme)
    quant.encode(x, scheme, scale, zero)
    compiled = torch.compile(reference.quantize)
    compiled(x, scheme)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
