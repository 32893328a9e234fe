"""Builds of ``grouped.cu`` (rows a thread holds, warps a block, registers asked) against each other
and against the Triton kernel, for one-pass ``int8-channel-g128`` quantize at 131072 x 8192 float16.

Every build is compiled here with its ``-D`` options, launched on the same input, checked bit for bit
against the Triton kernel's codes and scales, and timed (median of CUDA-event times, one launch each);
a device-to-device copy of the input gives the bandwidth ceiling. Prints ms, GB/s (fewest bytes:
read x, write codes and scales) and the fraction of the copy rate; writes ``$OUT/grouped_variants.json``.

    python benchmarks/grouped_variants.py [--tokens 131072] [--channels 8192] [--repeats 50]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from pathlib import Path

import cupy
import numpy as np
import torch

import kvpack
import kvpack.cuda as kc
from kvpack.bench import harness

GROUP = 128
#: name: (rows a thread holds R, most warps of a block, blocks asked per SM by __launch_bounds__).
BUILDS = {
    "r16-w8": (16, 16, 1),
    "r16-w8-3blocks": (16, 8, 3),
    "r8-w16": (8, 16, 1),
    "r8-w16-2blocks": (8, 16, 2),
    "r4-w32": (4, 32, 1),
}


def timed(fn, repeats: int) -> float:  # noqa: ANN001
    """Median milliseconds of ``fn()`` over ``repeats`` timings by the benchmark harness, after two
    warm-up calls."""
    fn()
    fn()
    samples, _ = harness.time_calls(fn, [()], repeats, torch.device("cuda"))
    return harness.median(samples) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--channels", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    t, d = args.tokens, args.channels
    x = torch.empty((1, t, d), dtype=torch.float16, device="cuda").uniform_(-1, 1)
    n_groups = -(-t // GROUP)
    quant_bytes = x.numel() * 2 + x.numel() + n_groups * d * 4
    dq_bytes = x.numel() + n_groups * d * 4 + x.numel() * 2
    rows = []

    dst = torch.empty_like(x)
    copy_ms = timed(functools.partial(dst.copy_, x), args.repeats)
    copy_gbps = 2 * x.numel() * 2 / copy_ms / 1e6
    del dst
    rows.append({"kernel": "copy", "ms": copy_ms, "gbps": copy_gbps, "of_copy": 1.0})

    want = kvpack.quantize(x, "int8-channel-g128", backend="triton")
    want_codes, want_scale = want.codes.view(1, t, d), want.scale.view(1, n_groups, d)

    def add(name: str, ms: float, nbytes: int, exact: bool | None, extra: dict | None = None) -> None:
        gbps = nbytes / ms / 1e6
        rows.append({"kernel": name, "ms": ms, "gbps": gbps, "of_copy": gbps / copy_gbps, "exact": exact,
                     **(extra or {})})
        print(f"{name:34s} {ms:8.4f} ms {gbps:7.0f} GB/s {gbps / copy_gbps:6.3f} of copy  exact={exact}",
              flush=True)

    print(f"copy {copy_ms:.4f} ms, {copy_gbps:.0f} GB/s; x {tuple(x.shape)} float16, groups of {GROUP}")
    fmt = "int8-channel-g128"
    add("triton quantize", timed(lambda: kvpack.quantize(x, fmt, backend="triton"), args.repeats),
        quant_bytes, True)
    add("triton dequantize", timed(lambda: kvpack.dequantize(want, backend="triton"), args.repeats), dq_bytes,
        None)
    add("cuda-grouped quantize (default)", timed(lambda: kvpack.quantize(x, fmt, backend="cuda-grouped"),
                                                 args.repeats), quant_bytes, None)

    codes = torch.empty_like(x, dtype=torch.int8)
    scale = torch.empty((1, n_groups, d), dtype=torch.float32, device="cuda")
    out = torch.empty_like(x)
    ptr = lambda a: np.uint64(a.data_ptr())  # noqa: E731
    sizes = tuple(np.int64(v) for v in (1, t, d, GROUP))
    stream = kc._stream(cupy, x.device)
    for name, (r, max_warps, min_blocks) in BUILDS.items():
        opts = (f"-DKVPACK_GROUPED_ROWS={r}", f"-DKVPACK_GROUPED_MAX_WARPS={max_warps}",
                f"-DKVPACK_GROUPED_MIN_BLOCKS={min_blocks}")
        module = cupy.RawModule(code=kc.source("grouped"), options=opts)
        quant = module.get_function("quantize_grouped_f16")
        deq = module.get_function("dequantize_grouped_f16")
        warps = max(1, min(max_warps, -(-GROUP // r)))
        grid, block = (n_groups, -(-d // 256), 1), (32, warps, 1)

        def q(quant=quant, grid=grid, block=block):  # noqa: ANN202
            with stream:
                quant(grid, block, (ptr(x), ptr(scale), ptr(codes), *sizes))

        def dq(deq=deq, grid=grid, block=block):  # noqa: ANN202
            with stream:
                deq(grid, block, (ptr(codes), ptr(scale), ptr(out), *sizes))

        codes.fill_(77)
        scale.fill_(77)
        q()
        torch.cuda.synchronize()
        exact = bool(torch.equal(codes, want_codes) and torch.equal(scale, want_scale))
        info = {"regs": quant.num_regs, "dq_regs": deq.num_regs, "block": list(block), "rows": r,
                "min_blocks": min_blocks}
        print(f"  {name}: {quant.num_regs} registers, {quant.shared_size_bytes} B shared, block {block}")
        add(f"{name} quantize", timed(q, args.repeats), quant_bytes, exact, info)
        dq()
        torch.cuda.synchronize()
        dq_exact = bool(torch.equal(out, kvpack.dequantize(want, backend="triton").view(1, t, d)))
        add(f"{name} dequantize", timed(dq, args.repeats), dq_bytes, dq_exact, info)

    result = {"environment": harness.environment(torch.device("cuda")), "tokens": t, "channels": d,
              "group": GROUP, "dtype": "float16", "rows": rows}
    path = Path(os.environ.get("OUT", ".")) / "grouped_variants.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
