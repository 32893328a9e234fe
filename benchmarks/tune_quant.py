"""Tile-shape search for the Triton quantize / dequantize kernels on one GPU (about 3-4 minutes).

For each kernel below, at 131072 x 8192, it times the default tiles and a few candidates (median of
``triton.testing.do_bench``), checks every candidate's output bit for bit against the default's (and
the default's against the CPU reference on a smaller input), prints the best per kernel (ms, GB/s
counting the fewest bytes each must move, fraction of a measured copy) and a ``TUNED`` table to
paste into ``kvpack/triton/quant.py``, and writes every row to ``$OUT/tune_quant.json``.

    python benchmarks/tune_quant.py            # all kernels
    python benchmarks/tune_quant.py int4 fp8   # the kernels whose name holds one of these words
    python benchmarks/tune_quant.py phases     # int8-channel float32: each phase, and torch.compile's
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from kvpack import reference
from kvpack.schemes import parse
from kvpack.triton import quant
from kvpack.triton.quant import Tiles

T, D = 131072, 8192
#: Stop trying candidates once this many seconds have passed (the defaults are always timed).
BUDGET_S = 200.0
_SM = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132
_SPLITS = triton.cdiv(8 * _SM, D // 256)  # the default split count of 256-wide column blocks

# name: (operation, format, dtype, candidates). The default (None) is always timed first.
_TOKEN_ROW = [Tiles(1, 8192, num_warps=4), Tiles(1, 8192, num_warps=16), Tiles(1, 4096, num_warps=4),
              Tiles(1, 2048, num_warps=4), Tiles(2, 4096, num_warps=8)]
_TOKEN_G32 = [Tiles(128, 32, num_warps=4), Tiles(256, 32, num_warps=4), Tiles(512, 32, num_warps=8),
              Tiles(64, 32, num_warps=2), Tiles(1024, 32, num_warps=16)]
KERNELS: dict[str, tuple[str, str, torch.dtype, list[Tiles]]] = {
    "quantize int8-channel fp32": ("quantize", "int8-channel", torch.float32, [
        Tiles(32, 256, splits=_SPLITS, num_warps=8), Tiles(16, 512, splits=_SPLITS, num_warps=8),
        Tiles(16, 512, splits=2 * _SPLITS, num_warps=8), Tiles(8, 1024, splits=_SPLITS, num_warps=8),
        Tiles(16, 512, splits=_SPLITS, num_warps=4), Tiles(32, 512, splits=_SPLITS, num_warps=16),
        Tiles(16, 512, splits=_SPLITS, num_warps=8, num_stages=3), Tiles(8, 512, splits=_SPLITS, num_warps=4),
        Tiles(32, 256, splits=_SPLITS, num_warps=4), Tiles(8, 512, splits=_SPLITS, num_warps=2),
        Tiles(4, 1024, splits=_SPLITS, num_warps=2)]),
    # The codes pass of a whole-axis quantize, from given scales (its tiles are the "encode" entry).
    "encode int8-channel fp32": ("encode", "int8-channel", torch.float32, [
        Tiles(8, 512, num_warps=4), Tiles(4, 1024, num_warps=4), Tiles(2, 1024, num_warps=4),
        Tiles(8, 1024, num_warps=8), Tiles(32, 256, num_warps=8), Tiles(4, 512, num_warps=2),
        Tiles(1, 1024, num_warps=4), Tiles(2, 512, num_warps=2), Tiles(16, 512, num_warps=4),
        Tiles(4, 2048, num_warps=8), Tiles(1, 2048, num_warps=2)]),
    "dequantize int8-channel fp32": ("dequantize", "int8-channel", torch.float32, [
        Tiles(8, 1024, num_warps=8), Tiles(4, 1024, num_warps=4), Tiles(32, 256, num_warps=8),
        Tiles(8, 2048, num_warps=16), Tiles(16, 1024, num_warps=8)]),
    "quantize int8-channel-g128 fp16": ("quantize", "int8-channel-g128", torch.float16, [
        Tiles(128, 64, num_warps=4), Tiles(128, 128, num_warps=8), Tiles(128, 128, num_warps=16),
        Tiles(64, 128, num_warps=4), Tiles(32, 256, num_warps=8), Tiles(32, 256, num_warps=4),
        Tiles(32, 512, num_warps=8), Tiles(16, 512, num_warps=8), Tiles(64, 256, num_warps=8),
        Tiles(32, 256, num_warps=8, num_stages=4), Tiles(16, 1024, num_warps=8),
        # Fewer warps per program (as the decode kernel preferred on the H100): less cross-warp reduction.
        Tiles(128, 64, num_warps=2), Tiles(64, 128, num_warps=2), Tiles(64, 64, num_warps=2),
        Tiles(128, 32, num_warps=1), Tiles(64, 64, num_warps=1),
        # Capped registers: 196 a thread left 8 warps per SM (Nsight Compute, sixth round).
        Tiles(64, 128, num_warps=2, maxnreg=168), Tiles(64, 128, num_warps=2, maxnreg=128),
        Tiles(64, 128, num_warps=4, maxnreg=128), Tiles(64, 128, num_warps=4, maxnreg=96),
        Tiles(32, 128, num_warps=2, maxnreg=128), Tiles(64, 64, num_warps=2, maxnreg=96),
        # Around the best of the fourth round (64 x 128, 2 warps; 1.43 ms with reciprocal quotients).
        Tiles(64, 128, num_warps=1), Tiles(32, 128, num_warps=1), Tiles(32, 128, num_warps=2),
        Tiles(64, 128, num_warps=2, num_stages=1), Tiles(64, 128, num_warps=2, num_stages=3),
        Tiles(128, 128, num_warps=2), Tiles(128, 128, num_warps=4), Tiles(32, 256, num_warps=2),
        Tiles(64, 256, num_warps=4)]),
    "dequantize int8-token fp16": ("dequantize", "int8-token", torch.float16, _TOKEN_ROW),
    "dequantize fp8-e4m3 fp16": ("dequantize", "fp8-e4m3", torch.float16, _TOKEN_ROW),
    "dequantize int8-token-g32 fp16": ("dequantize", "int8-token-g32", torch.float16, _TOKEN_G32),
    "quantize int4-token-g32 fp16": ("quantize", "int4-token-g32", torch.float16, _TOKEN_G32),
    "dequantize int4-token-g32 fp16": ("dequantize", "int4-token-g32", torch.float16, _TOKEN_G32),
    "quantize int2-token-g32 fp16": ("quantize", "int2-token-g32", torch.float16, _TOKEN_G32),
    "dequantize int2-token-g32 fp16": ("dequantize", "int2-token-g32", torch.float16, _TOKEN_G32),
    "quantize int4-channel-g64 fp16": ("quantize", "int4-channel-g64", torch.float16, [
        Tiles(64, 64, num_warps=4), Tiles(64, 256, num_warps=8), Tiles(64, 128, num_warps=4),
        Tiles(64, 256, num_warps=16), Tiles(32, 256, num_warps=8)]),
}


def _bytes(operation: str, scheme, dtype: torch.dtype) -> int:
    """The fewest bytes the operation must move: the input once (twice for a whole-axis channel
    quantize, whose codes need every token's maximum first), the output once, the scales."""
    n = T * D
    scales = scheme.scale_shape(T, D)
    side = scales[0] * scales[1] * torch.tensor([], dtype=scheme.scale_dtype).element_size()
    side *= 1 if scheme.symmetric else 2
    codes = T * scheme.code_shape(T, D)[1] * torch.tensor([], dtype=scheme.code_dtype).element_size()
    data = n * dtype.itemsize
    if operation == "quantize":
        reads = 2 if scheme.axis == "channel" and scheme.group_size(T, D) == T else 1
        return reads * data + codes + side
    return codes + side + data  # encode reads the scales, dequantize writes them back as data


def _bits(t: torch.Tensor) -> torch.Tensor:
    """FP8 codes compared as bytes (torch.equal does not take them)."""
    return t.view(torch.uint8) if t.dtype.itemsize == 1 else t


def _same(got, want) -> bool:
    """Every output tensor equal bit for bit (None where the other is None)."""
    return len(got) == len(want) and all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(_bits(a), _bits(b)))
        for a, b in zip(got, want, strict=True)
    )


def _check_default(operation: str, scheme, dtype: torch.dtype) -> bool:
    """The default tiles against the CPU reference on a smaller input (2 x 4096 x 1024)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4096, 1024, generator=gen).mul_(3).to(dtype)
    want = reference.quantize(x, scheme)
    got = quant.quantize(x.cuda(), scheme)
    ok = _same([t.cpu() if t is not None else None for t in got], list(want))
    if operation == "dequantize":
        back = quant.dequantize(*got, scheme, 1024, dtype).cpu()
        ok = ok and torch.equal(back, reference.dequantize(*want, scheme, 1024, dtype))
    return ok


def tune(name: str, operation: str, fmt: str, dtype: torch.dtype, candidates: list[Tiles],
         copy_gbs: float, deadline: float) -> list[dict]:
    scheme = parse(fmt)
    nbytes = _bytes(operation, scheme, dtype)
    ref_ok = _check_default(operation, scheme, dtype)
    x = torch.randn(1, T, D, device="cuda", dtype=dtype)
    if operation == "quantize":
        def run(tiles):
            return quant.quantize(x, scheme, tiles)
    elif operation == "encode":
        scale, zero = quant.compute_scales(x, scheme)

        def run(tiles):
            return (quant.encode(x, scheme, scale, zero, tiles),)
    else:
        codes, scale, zero = quant.quantize(x, scheme)
        del x

        def run(tiles):
            return (quant.dequantize(codes, scale, zero, scheme, D, dtype, tiles),)
    want = run(None)
    rows = []
    for tiles in [None, *candidates]:
        if tiles is not None and time.monotonic() > deadline:
            rows.append({"kernel": name, "tiles": repr(tiles), "skipped": "time budget"})
            continue
        row = {"kernel": name, "operation": operation, "format": fmt, "dtype": str(dtype)[6:],
               "tiles": repr(tiles) if tiles else "default"}
        try:
            got = run(tiles)
            row["exact"] = _same(got, want) if tiles else ref_ok
            del got
            ms = do_bench(lambda tiles=tiles: run(tiles), warmup=25, rep=100, return_mode="median")
            gbs = nbytes / ms / 1e6
            row.update(ms=round(ms, 4), gbs=round(gbs, 1), frac_copy=round(gbs / copy_gbs, 3))
            row["tiles_obj"] = tiles
        except Exception as exc:  # a candidate that does not compile or launch is reported, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
        print(f"  {name:34s} {row['tiles']:70s} {row.get('ms', float('nan')):8.3f} ms"
              f"  exact={row.get('exact')}{'  ' + row['error'] if 'error' in row else ''}", flush=True)
    torch.cuda.empty_cache()
    return rows


def _copy_gbs() -> float:
    """Bandwidth of a float32 device-to-device copy of the benchmark's size, read + write."""
    src = torch.randn(T, D, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=100, return_mode="median")
    gbs = 2 * src.numel() * 4 / ms / 1e6
    print(f"copy float32 {ms:.3f} ms = {gbs:.1f} GB/s (read + write)")
    return gbs


def phases(copy_gbs: float) -> list[dict]:
    """Where a whole-axis ``int8-channel`` float32 quantize spends its time, against ``torch.compile`` of
    the reference: each phase timed alone, and the kernels of both under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    scheme = parse("int8-channel")
    x = torch.randn(1, T, D, device="cuda")
    scale, zero = quant.compute_scales(x, scheme)
    compiled = torch.compile(reference.quantize)
    calls = {
        "triton quantize": lambda: quant.quantize(x, scheme),
        "triton scales only": lambda: quant.compute_scales(x, scheme),
        "triton codes from given scales": lambda: quant.encode(x, scheme, scale, zero),
        "torch amax over tokens (read once)": lambda: x.abs().amax(dim=1),
        "torch.compile reference quantize": lambda: compiled(x, scheme),
    }
    data = T * D * 4
    floors = {"triton scales only": data, "torch amax over tokens (read once)": data,
              "triton codes from given scales": data + T * D}
    rows = []
    for name, fn in calls.items():
        fn()
        ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
        nbytes = floors.get(name, 2 * data + T * D)
        row = {"kernel": f"phase: {name}", "ms": round(ms, 4), "gbs": round(nbytes / ms / 1e6, 1),
               "frac_copy": round(nbytes / ms / 1e6 / copy_gbs, 3)}
        rows.append(row)
        print(f"  phase {name:40s} {ms:8.3f} ms  {row['gbs']:7.1f} GB/s  {row['frac_copy']:6.1%} of copy",
              flush=True)
    for name in ("triton quantize", "torch.compile reference quantize"):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                calls[name]()
            torch.cuda.synchronize()
        print(f"  kernels of {name} (5 calls):")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
    return rows


def main() -> int:
    words = sys.argv[1:]
    props = torch.cuda.get_device_properties(0)
    print(f"device {props.name}, torch {torch.__version__}, triton {triton.__version__}")
    copy_gbs = _copy_gbs()
    phase_rows = []
    if "phases" in words:
        words = [w for w in words if w != "phases"]
        phase_rows = phases(copy_gbs)
        if not words:
            _write(props.name, copy_gbs, phase_rows)
            return 0
    deadline = time.monotonic() + BUDGET_S
    rows = list(phase_rows)
    for name, (operation, fmt, dtype, candidates) in KERNELS.items():
        if words and not any(w in name for w in words):
            continue
        rows += tune(name, operation, fmt, dtype, candidates, copy_gbs, deadline)

    print("\n== best per kernel (exact candidates only)")
    table, failures = {}, 0
    for name, (operation, fmt, dtype, _) in KERNELS.items():
        mine = [r for r in rows if r["kernel"] == name and "ms" in r]
        failures += sum(1 for r in mine if not r["exact"])
        good = [r for r in mine if r["exact"]]
        if not good:
            continue
        best = min(good, key=lambda r: r["ms"])
        default = next((r for r in good if r["tiles"] == "default"), best)
        print(f"  {name:34s} {best['ms']:7.3f} ms {best['gbs']:7.1f} GB/s {best['frac_copy']:6.1%} of copy"
              f"  (default {default['ms']:.3f} ms)  {best['tiles']}")
        if best["tiles_obj"] is not None and best["ms"] < 0.98 * default["ms"]:
            table[(operation, parse(fmt).name, str(dtype)[6:])] = best["tiles_obj"]
    print("\n== paste into kvpack/triton/quant.py (TUNED; only kernels >= 2% faster than their default):")
    print("TUNED: dict[tuple[str, str, str], Tiles] = {")
    for key, tiles in table.items():
        print(f"    {key!r}: {tiles!r},")
    print("}")
    print(f"\ninexact candidates: {failures}")
    for r in rows:
        r.pop("tiles_obj", None)
    _write(props.name, copy_gbs, rows)
    return 1 if failures else 0


def _write(device: str, copy_gbs: float, rows: list[dict]) -> None:
    out = os.environ.get("OUT")
    if out:
        path = os.path.join(out, "tune_quant.json")
        with open(path, "w") as f:
            summary = {"device": device, "copy_gbs": copy_gbs, "shape": [T, D], "rows": rows}
            json.dump(summary, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
