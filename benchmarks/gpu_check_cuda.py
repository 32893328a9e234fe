"""Check and time kvpack's CUDA C kernels (kvpack.cuda) on a GPU, in one run.

1. Runs the GPU tests of ``tests/test_cuda.py`` (bit-exact against kvpack.reference on many shapes
   and dtypes, poisoned outputs, odd alignments, NaN/Inf errors, the current stream, CUDA-graph
   capture, more than 2^31 elements) and prints a PASS/FAIL/SKIP table.
2. Times the scale reduction, each variant's quantize and dequantize kernels, and quantize with its
   scales, on 131072 x 8192 (the paper's largest) in float32 and float16, as the median of CUDA-event
   timings, next to a device-to-device copy of the input (the bandwidth ceiling). GB/s counts the
   fewest bytes each operation must move: the input once, the output once, the scales; quantize
   with its scales reads the input twice (every code needs the channel's max over all the tokens,
   and the tensor is far larger than the L2 cache), so its floor counts two reads.

Usage (from the repository root, kvpack installed or not)::

    python benchmarks/gpu_check_cuda.py [--reps 20] [--tokens 131072] [--channels 8192] [--no-tests]

Writes ``gpu_check_cuda.json`` into ``$OUT`` when that variable is set.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import itertools
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]

import torch  # noqa: E402

import kvpack.cuda as kc  # noqa: E402
from kvpack.schemes import parse  # noqa: E402

INT8 = parse("int8-channel")


def gpu_test_cases():
    """``(label, test function, keyword arguments)`` for every parameter set of every ``test_gpu_*``
    function of tests/test_cuda.py."""
    tests = importlib.import_module("test_cuda")
    for name, fn in inspect.getmembers(tests, inspect.isfunction):
        if not name.startswith("test_gpu_"):
            continue
        marks = [m for m in getattr(fn, "pytestmark", []) if m.name == "parametrize"]
        keys = [[k.strip() for k in m.args[0].split(",")] for m in marks]
        for combo in itertools.product(*(m.args[1] for m in marks)):
            kwargs = {}
            for names, value in zip(keys, combo, strict=True):
                kwargs.update(zip(names, value if len(names) > 1 else (value,), strict=True))
            label = name.removeprefix("test_gpu_") + "".join(f"[{_short(v)}]" for v in kwargs.values())
            yield label, fn, kwargs


def run_gpu_tests() -> list[dict]:
    """Run every GPU test case; a failure is printed and recorded, and the run goes on."""
    import pytest

    rows = []
    for label, fn, kwargs in gpu_test_cases():
        start = time.perf_counter()
        try:
            fn(**kwargs)
            result, detail = "PASS", ""
        except pytest.skip.Exception as e:
            result, detail = "SKIP", str(e)
        except Exception as e:
            result, detail = "FAIL", f"{type(e).__name__}: {e}"[:400]
            traceback.print_exc()
        seconds = round(time.perf_counter() - start, 2)
        rows.append({"check": label, "result": result, "seconds": seconds, "detail": detail})
        print(f"{label:58s} {result}  {seconds:6.2f}s  {detail[:100]}", flush=True)
    return rows


def _short(v: object) -> str:
    return str(v).removeprefix("torch.")


def median_ms(fn, reps: int) -> float:
    """Median over ``reps`` CUDA-event timings of ``fn()``, after 3 untimed calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_kernels(t: int, d: int, dtype: torch.dtype, reps: int) -> list[dict]:
    """Rows of (operation, variant, ms, bytes, GB/s, fraction of the copy's GB/s) at [1, t, d]."""
    n = t * d
    es = torch.empty(0, dtype=dtype).element_size()
    x = torch.randn((1, t, d), device="cuda", dtype=dtype)
    scale = torch.empty((1, 1, d), device="cuda")
    codes = torch.empty((1, t, d), device="cuda", dtype=torch.int8)
    out = torch.empty_like(x)
    rows = []

    def add(op: str, variant: str, ms: float, nbytes: int) -> None:
        gbps = nbytes / ms / 1e6
        rows.append(
            {
                "op": op,
                "variant": variant,
                "dtype": _short(dtype),
                "shape": [1, t, d],
                "ms": round(ms, 4),
                "bytes": nbytes,
                "gbps": round(gbps, 1),
            }
        )

    def copy_ms() -> float:
        dst = torch.empty_like(x)
        return median_ms(lambda: dst.copy_(x), reps)

    add("copy", "torch", copy_ms(), 2 * es * n)
    add("scales", "gpu-absmax", median_ms(lambda: kc.absmax_scales_into(x, scale), reps), es * n + 4 * d)
    for v in kc.VARIANTS:
        add(
            "quantize-kernel",
            v,
            median_ms(lambda v=v: kc.encode_into(v, x, scale, codes), reps),
            es * n + n + 4 * d,
        )

        def quantize(v: str = v) -> None:
            kc.encode_into(v, x, kc.absmax_scales_into(x, scale), codes)

        add("quantize+scales", v, median_ms(quantize, reps), 2 * es * n + n + 4 * d)
        add(
            "dequantize",
            v,
            median_ms(lambda v=v: kc.decode_into(v, codes, scale, out), reps),
            n + es * n + 4 * d,
        )
    copy = rows[0]["gbps"]
    for r in rows:
        r["of_copy"] = round(r["gbps"] / copy, 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=131072)
    parser.add_argument("--channels", type=int, default=8192)
    parser.add_argument("--no-tests", action="store_true", help="timings only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: nothing to check")
    import cupy

    props = torch.cuda.get_device_properties(0)
    report = {
        "device": props.name,
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cupy": cupy.__version__,
        "nvrtc": ".".join(map(str, cupy.cuda.nvrtc.getVersion())),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    print(json.dumps(report))
    start = time.perf_counter()
    for name in kc.SOURCES:
        kc.module(name).compile()
    report["compile_seconds"] = round(time.perf_counter() - start, 2)
    cache = os.environ.get("CUPY_CACHE_DIR", "~/.cupy/kernel_cache")
    print(f"compiled {len(kc.SOURCES)} sources in {report['compile_seconds']} s (CuPy cache: {cache})")

    report["checks"] = [] if args.no_tests else run_gpu_tests()
    counts = {k: sum(r["result"] == k for r in report["checks"]) for k in ("PASS", "FAIL", "SKIP")}
    print(f"checks: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped")

    report["timings"] = []
    for dtype in (torch.float32, torch.float16):
        rows = time_kernels(args.tokens, args.channels, dtype, args.reps)
        report["timings"] += rows
        torch.cuda.empty_cache()
        print(f"\n{args.tokens} x {args.channels} {_short(dtype)}, median of {args.reps}")
        print(f"{'operation':18s} {'variant':12s} {'ms':>8s} {'GB/s':>8s} {'of copy':>8s}")
        for r in rows:
            print(f"{r['op']:18s} {r['variant']:12s} {r['ms']:8.3f} {r['gbps']:8.0f} {r['of_copy']:8.1%}")

    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "gpu_check_cuda.json"
        path.write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    if counts["FAIL"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
