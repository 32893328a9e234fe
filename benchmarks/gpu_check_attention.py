"""Check and time kvpack's decode attention (kvpack.attention.decode, the Triton flash-decoding kernel).

1. Correctness at GPU sizes: every cache preset (int8, int4, fp8, int2) at head dims 64, 96, 128 and
   256 in float16 (128 also in bfloat16), with 32 query heads over 8 or 32 KV heads and 1 or 4 query
   tokens; long padded batches; forced split counts; other key/value format pairs; CUDA-graph replay
   and torch.compile. Each case compares with float32 attention over the layer's dequantized cache
   (kvpack.reference.attention): PASS when the relative L2 error is below 1e-2.
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
import traceback
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

import torch  # noqa: E402

from kvpack import reference  # noqa: E402
from kvpack.attention import decode, reference_decode  # noqa: E402
from kvpack.bench import attention as bench  # noqa: E402
from kvpack.bench import harness  # noqa: E402
from kvpack.cache import CACHE_PRESETS, QuantizedLayer  # noqa: E402
from kvpack.triton.attention import KernelConfig, default_config  # noqa: E402

DEVICE = torch.device("cuda")
LIMIT = 1e-2
FP16, BF16 = torch.float16, torch.bfloat16


def layer_of(formats: tuple[str, str], batch: int, kv_heads: int, tokens: int, head_dim: int,
             dtype: torch.dtype = FP16, residual: int = 128, group: int | None = None) -> QuantizedLayer:
    g = torch.Generator(device=DEVICE).manual_seed(tokens + head_dim)
    shape = (batch, kv_heads, tokens, head_dim)
    outliers = 1 + 4 * (torch.rand(head_dim, generator=g, device=DEVICE) > 0.9)
    layer = QuantizedLayer(*formats, residual=residual, group=group)
    keys = torch.randn(shape, generator=g, device=DEVICE) * outliers
    layer.append(keys.to(dtype), torch.randn(shape, generator=g, device=DEVICE).to(dtype))
    return layer


def queries(layer: QuantizedLayer, q_heads: int, q_len: int, seed: int = 1) -> torch.Tensor:
    b, _, _, d = layer.window_keys.shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(b, q_heads, q_len, d, generator=g, device=DEVICE).to(layer.dtype)


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def expected(q: torch.Tensor, layer: QuantizedLayer, start: torch.Tensor | None = None,
             lengths: torch.Tensor | None = None) -> torch.Tensor:
    """float32 attention over the dequantized cache, row by row when padded."""
    keys, values = layer.dequantized()
    n, lq = layer.seq_length, q.shape[2]
    if start is None and lengths is None:
        return reference.attention(q, keys, values, causal_offset=n - lq)
    rows = []
    for b in range(q.shape[0]):
        s = 0 if start is None else int(start[b])
        e = n if lengths is None else int(lengths[b])
        rows.append(reference.attention(q[b:b + 1], keys[b:b + 1, :, s:e], values[b:b + 1, :, s:e],
                                        causal_offset=e - s - lq))
    return torch.cat(rows)


# ------------------------------------------------------------------------------------------ correctness


def correctness_cases() -> list[tuple[str, Callable[[], float]]]:
    """``(label, case)``; a case returns the relative error of the worst output it checks."""
    cases = []

    def plain(formats, batch, kv_heads, tokens, head_dim, dtype, q_heads, q_len, residual=128, group=None,
              config=None):
        def run() -> float:
            layer = layer_of(formats, batch, kv_heads, tokens, head_dim, dtype, residual, group)
            q = queries(layer, q_heads, q_len)
            return rel_error(decode(q, layer, config=config), expected(q, layer))
        return run

    for preset, formats in CACHE_PRESETS.items():
        for head_dim in (64, 96, 128, 256):
            for dtype in (FP16, BF16) if head_dim == 128 else (FP16,):
                for q_heads, kv_heads, q_len in ((32, 8, 1), (32, 32, 1), (32, 8, 4)):
                    label = (f"{preset} D={head_dim} {str(dtype)[6:]} {q_heads}q/{kv_heads}kv Lq={q_len} "
                             f"T=4133 B=2")
                    cases.append((label, plain(formats, 2, kv_heads, 4133, head_dim, dtype, q_heads, q_len)))
    for formats in (("int8-token", "int8-channel-g64"), ("fp8-e5m2-channel-g64", "fp8-e5m2"),
                    ("int4-channel-g64", "int4-token-g32"), ("int2-token", "int8-token-g16")):
        cases.append((f"{'/'.join(formats)} D=128 fp16 32q/8kv Lq=1 T=5000",
                      plain(formats, 2, 8, 5000, 128, FP16, 32, 1)))
    cases.append(("int8-channel/int4-channel group=40 D=128 fp16 Lq=2 T=3000",
                  plain(("int8-channel", "int4-channel"), 2, 8, 3000, 128, FP16, 32, 2, group=40)))
    cases.append(("int8 window only T=5 D=128", plain(CACHE_PRESETS["int8"], 2, 8, 5, 128, FP16, 32, 1)))
    cases.append(("int4 window empty T=4096 residual=0",
                  plain(CACHE_PRESETS["int4"], 2, 8, 4096, 128, FP16, 32, 1, residual=0)))
    for splits in (1, 7, 64):
        for block_n in (32, 64):
            config = KernelConfig(block_n=block_n, num_splits=splits)
            cases.append((f"int8 T=32868 B=2 splits={splits} block_n={block_n}",
                          plain(CACHE_PRESETS["int8"], 2, 8, 32868, 128, BF16, 32, 1, config=config)))

    def padded(preset: str, q_len: int) -> Callable[[], float]:
        def run() -> float:
            layer = layer_of(CACHE_PRESETS[preset], 4, 8, 32868, 128, BF16)
            n = layer.seq_length
            start = torch.tensor([0, 1000, 17, 30000], device=DEVICE)
            lengths = torch.tensor([n, n, n - 5000, n - 1], device=DEVICE)
            q = queries(layer, 32, q_len)
            out = decode(q, layer, start=start, lengths=lengths)
            return rel_error(out, expected(q, layer, start, lengths))
        return run

    for preset in CACHE_PRESETS:
        for q_len in (1, 3):
            cases.append((f"{preset} padded B=4 T=32868 bf16 Lq={q_len}", padded(preset, q_len)))

    def graph() -> float:
        layer = layer_of(CACHE_PRESETS["int4"], 2, 8, 5000, 128)
        q = queries(layer, 32, 1)
        start = torch.zeros(2, dtype=torch.int32, device=DEVICE)
        decode(q, layer, start=start)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = decode(q, layer, start=start)
        q.copy_(queries(layer, 32, 1, seed=9))
        start.copy_(torch.tensor([0, 300]))
        g.replay()
        keys, values = layer.dequantized()
        return rel_error(out, reference_decode(q, keys, values, 128 ** -0.5, start=start))

    def compiled() -> float:
        layer = layer_of(CACHE_PRESETS["fp8"], 2, 8, 3000, 128)
        step = torch.compile(lambda x: decode(x, layer) + 1, mode="reduce-overhead", fullgraph=True)
        worst = 0.0
        for seed in range(3):
            q = queries(layer, 32, 1, seed=seed)
            worst = max(worst, rel_error(step(q) - 1, expected(q, layer)))
        return worst

    cases += [("CUDA graph capture and replay", graph), ("torch.compile reduce-overhead", compiled)]
    return cases


def check_correctness() -> list[dict]:
    rows = []
    for label, case in correctness_cases():
        t0 = time.perf_counter()
        try:
            err = case()
            status = "PASS" if err < LIMIT else "FAIL"
            rows.append({"case": label, "status": status, "rel_error": err})
        except Exception as exc:  # a failing case is reported, the others still run
            rows.append({"case": label, "status": "ERROR", "rel_error": None,
                         "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        rows[-1]["seconds"] = round(time.perf_counter() - t0, 2)
        torch.cuda.empty_cache()
        print(f"{rows[-1]['status']:5}  {harness.fmt_value(rows[-1]['rel_error']):>10}  {label}", flush=True)
        if rows[-1]["status"] == "ERROR":
            print("       " + rows[-1]["error"][:300], flush=True)
    return rows


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
    print("== correctness (relative L2 error against float32 attention over the dequantized cache)")
    result["correctness"] = check_correctness()
    failed = [r for r in result["correctness"] if r["status"] != "PASS"]
    print(f"{len(result['correctness']) - len(failed)} PASS, {len(failed)} FAIL/ERROR "
          f"({time.perf_counter() - t0:.0f} s)\n", flush=True)

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
