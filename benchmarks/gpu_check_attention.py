"""Check and time kvpack's decode attention (kvpack.attention.decode, the Triton flash-decoding kernel).

1. Correctness: runs tests/test_attention.py and tests/test_hf_attention.py on the GPU and prints a
   PASS/FAIL/SKIP table. At GPU sizes: every cache preset (int8, int4, fp8, int2) at head dims 64, 96,
   128 and 256 in float16 and bfloat16, 32 query heads over 8 or 32 KV heads (and 64 over 8) with 1 or
   4 query tokens; long padded batches (32868 tokens, left and right padding, 1 and 3 queries); forced
   split counts and tile sizes; CUDA-graph replay and torch.compile. At small sizes: every key/value
   format pair, odd shapes, the transformers attention. Every case compares with float32 attention over
   the layer's dequantized cache (kvpack.reference.attention): relative L2 error below 1e-2.
2. Tile sweep: int8 and int4 at batch 8, 32 query / 8 KV heads, 32768 tokens, for tokens per tile,
   warps, pipeline stages and split counts, next to the default choice.
3. The kernel table of ``kvpack bench-attention`` in a short form (batches 1 and 8, 16K and 32K tokens,
   8 and 32 KV heads, every preset, SDPA float16 and dequantize-then-SDPA beside them).

Usage (from the repository root)::

    python benchmarks/gpu_check_attention.py [--no-sweep] [--no-bench] [--repeats 10]

Writes ``gpu_check_attention.json`` into ``$OUT`` when that variable is set (else the current folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

import pytest  # noqa: E402
import torch  # noqa: E402

from kvpack.attention import decode  # noqa: E402
from kvpack.bench import attention as bench  # noqa: E402
from kvpack.bench import harness  # noqa: E402
from kvpack.cache import QuantizedLayer  # noqa: E402
from kvpack.triton.attention import KernelConfig, default_config  # noqa: E402

DEVICE = torch.device("cuda")
TESTS = ("tests/test_attention.py", "tests/test_hf_attention.py")


def queries(layer: QuantizedLayer, q_heads: int, q_len: int) -> torch.Tensor:
    b, _, _, d = layer.window_keys.shape
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return torch.randn(b, q_heads, q_len, d, generator=g, device=DEVICE).to(layer.dtype)


# ------------------------------------------------------------------------------------------ correctness


class _Collector:
    """A pytest plugin that keeps each test's outcome, duration and failure text."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.outcome != "passed":
            status = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[report.outcome]
            row = {"case": report.nodeid.split("::", 1)[1], "file": report.fspath, "stage": report.when,
                   "status": status, "seconds": round(report.duration, 2)}
            if report.outcome != "passed":
                row["detail"] = str(report.longrepr)[-1500:]
            self.rows.append(row)
            print(f"{status:4}  {row['seconds']:7.2f} s  {row['case']}", flush=True)


def check_correctness() -> list[dict]:
    """Every test of the two test files, on the GPU: the GPU-size tests (every preset at head dims 64,
    96, 128, 256, long padded batches, forced splits, CUDA graphs, torch.compile) and the small-size
    ones (every format pair, odd shapes, padding, custom op), plus the transformers tests."""
    collector = _Collector()
    pytest.main([*(str(ROOT / t) for t in TESTS), "-q", "-p", "no:cacheprovider", "--no-header"],
                plugins=[collector])
    return collector.rows


# ------------------------------------------------------------------------------------------------ sweep


def timed(q: torch.Tensor, layer: QuantizedLayer, config: KernelConfig, repeats: int) -> float:
    """Median ms of ``decode(q, layer, config=config)`` after a warm-up call."""
    decode(q, layer, config=config)
    torch.cuda.synchronize()
    samples, _ = harness.time_calls(lambda: decode(q, layer, config=config), [()], repeats, DEVICE)
    return harness.median(samples) * 1e3


def sweep(repeats: int) -> list[dict]:
    """Time the kernel over tile shapes, warps, stages and split counts (int8 and int4, batch 8,
    32 q / 8 KV heads, 32768 tokens, head dim 128)."""
    rows = []
    for preset in ("int8", "int4"):
        layer = bench.filled_layer(preset, 8, 8, 32768, 128, DEVICE)
        nbytes = bench.layer_bytes(layer)
        q = queries(layer, 32, 1)
        base = default_config(128, layer.group, layer.key_scheme, layer.value_scheme)
        configs = [dataclasses.replace(base)]
        configs += [KernelConfig(block_n=n, num_warps=w, num_stages=s)
                    for n in (32, 64) for w in (4, 8) for s in (1, 2, 3, 4)]
        configs += [dataclasses.replace(base, num_splits=s) for s in (4, 8, 16, 32, 64)]
        for i, config in enumerate(configs):
            try:
                ms = timed(q, layer, config, repeats)
                rows.append({"preset": preset, "default": i == 0, **dataclasses.asdict(config), "ms": ms,
                             "gbps": nbytes / ms / 1e6})
            except Exception as exc:  # a configuration that does not compile or fit is reported
                rows.append({"preset": preset, "default": i == 0, **dataclasses.asdict(config),
                             "error": f"{type(exc).__name__}: {exc}"[:300]})
        del layer
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
    parser.add_argument("--no-bench", action="store_true", help="skip the kernel table")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions, median kept (default 10)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this check needs one", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    result: dict = {"kind": "kvpack-gpu-check-attention", "environment": harness.environment(DEVICE)}
    print("== correctness: the attention tests on the GPU")
    result["correctness"] = check_correctness()
    failed = [r for r in result["correctness"] if r["status"] == "FAIL"]
    counts = {s: sum(r["status"] == s for r in result["correctness"]) for s in ("PASS", "FAIL", "SKIP")}
    took = time.perf_counter() - t0
    print(f"{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP ({took:.0f} s)")
    for r in failed:
        print(f"\nFAIL {r['case']}:\n{r['detail']}")
    print(flush=True)

    if not args.no_sweep:
        print("== tile sweep: batch 8, 32 q / 8 KV heads, 32768 tokens, head dim 128")
        result["sweep"] = sweep(args.repeats)
        print(harness.text_table(result["sweep"], ["preset", "default", "block_n", "num_warps", "num_stages",
                                                   "num_splits", "ms", "gbps", "error"]), flush=True)
        for preset in ("int8", "int4"):
            ok = [r for r in result["sweep"] if r["preset"] == preset and "ms" in r]
            if ok:
                best, default = min(ok, key=lambda r: r["ms"]), next((r for r in ok if r["default"]), None)
                print(f"{preset}: best {best['ms']:.4f} ms ({best['gbps']:.0f} GB/s) with "
                      f"block_n={best['block_n']} warps={best['num_warps']} stages={best['num_stages']} "
                      f"splits={best['num_splits']}; default {default and round(default['ms'], 4)} ms")
        print(flush=True)

    if not args.no_bench:
        print("== kernel table (kvpack bench-attention, short form)")
        ns = argparse.Namespace(batches=[1, 8], contexts=[16384, 32768], kv_heads=[8, 32], q_heads=32,
                                head_dim=128, formats=list(bench.FORMATS), repeats=args.repeats, seed=0)

        class Quiet:
            def set_postfix_str(self, text: str) -> None:
                print(f"  {text}", flush=True)

            def update(self, n: int) -> None:
                pass

        kb = bench.KernelBench(ns, DEVICE)
        kb.run(Quiet())
        result["copy_gbps"] = kb.copy_gbps
        result["bench"] = [dataclasses.asdict(r) for r in kb.rows]
        bench.print_tables({"copy_gbps": kb.copy_gbps, "rows": result["bench"]})

    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "gpu_check_attention.json", result)
    print(f"\nwrote {out / 'gpu_check_attention.json'} in {result['seconds']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
