"""Where the decode kernel's time goes besides streaming the cache: time against context length.

At batch 8, 32 query / 8 KV heads, head dim 128, for contexts from 1K to 64K tokens, times
``kvpack.attention.decode`` (int8 and int4 presets; default launch, and split counts forced to one
and two waves of programs) and float16 SDPA, with inputs rotated past L2 as ``kvpack bench-attention``
does, and splits one call's GPU time between the decode kernel and the combine kernel under the
profiler. A straight-line fit of time against context gives the fixed cost (intercept) and the
streaming rate (slope) of each. Then a few calls on the GPU clock (``timeline``): when each program
starts and ends, and when each SM's last program ends; and capped registers per thread (``maxnreg``),
timed as CUDA graph replays.

    python benchmarks/decode_overhead.py        # writes $OUT/decode_overhead.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from dataclasses import replace

import torch
from torch.profiler import ProfilerActivity, profile

from kvpack.attention import decode
from kvpack.bench import attention as bench
from kvpack.bench import harness
from kvpack.triton import attention as kernel

B, HQ, H, D = 8, 32, 8, 128
CONTEXTS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
SMOKE = "--smoke" in sys.argv  # a tiny run on the CPU through Triton's interpreter


def _time(fn, inputs) -> float:
    fn(*inputs[0])
    harness.synchronize(inputs[0][0].device)
    samples, _ = harness.time_calls(fn, inputs, 2 if SMOKE else 30, inputs[0][0].device)
    return harness.median(samples) * 1e3


def _kernel_split(fn, args) -> dict[str, float]:
    if SMOKE:
        return {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            fn(*args)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count:
            name = "combine" if "combine" in e.key else "decode" if "decode" in e.key else e.key[:30]
            out[name] = out.get(name, 0.0) + e.device_time_total / 10 / 1e3
    return out


def timeline(preset: str, tokens: int, splits: int | None, dev: torch.device) -> dict:
    """One call's programs on the GPU clock: when they start and end, relative to the first start (us),
    and the mean time of the programs of the last split (which hold the window) and of the others."""
    from kvpack.attention import _store

    layer = bench.filled_layer(preset, B, H, tokens, D, dev)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.float16)
    base = kernel.default_config(D, layer.group, layer.key_scheme, layer.value_scheme, HQ // H)
    cfg = replace(base, num_splits=splits)
    stamps = torch.zeros(3 * B * H * kernel.MAX_SPLITS * 4, dtype=torch.int64, device=dev)

    def call() -> torch.Tensor:
        return kernel.decode_attention(
            q, *_store(layer), layer.window_keys, layer.window_values, layer.num_quantized, layer.num_window,
            layer.key_scheme, layer.value_scheme, layer.group, D**-0.5, config=cfg, timeline=stamps)

    for _ in range(3):
        stamps.zero_()
        call()
        torch.cuda.synchronize()
    t = stamps.view(-1, 3)
    n = int((t[:, 1] > 0).sum())
    splits_used = n // (B * H)  # one row block: program (bh, split) at bh * splits + split
    last = torch.arange(n) % splits_used == splits_used - 1
    t = t[:n].cpu().double()
    begin, end, sm = (t[:, 0] - t[:, 0].min()) / 1e3, (t[:, 1] - t[:, 0].min()) / 1e3, t[:, 2]
    dur = end - begin
    q = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.double)
    sm_end = torch.zeros(int(sm.max()) + 1, dtype=torch.double).scatter_reduce(0, sm.long(), end, "amax")
    out = {"preset": preset, "context": tokens, "splits": splits_used,
           "last_split_mean_us": round(float(dur[last].mean()), 2),
           "other_splits_mean_us": round(float(dur[~last].mean()), 2),
           "programs": len(t), "span_us": round(float(end.max()), 2),
           "start_quantiles_us": [round(float(x), 2) for x in begin.quantile(q)],
           "end_quantiles_us": [round(float(x), 2) for x in end.quantile(q)],
           "duration_quantiles_us": [round(float(x), 2) for x in dur.quantile(q)],
           "sm_last_end_quantiles_us": [round(float(x), 2) for x in sm_end[sm_end > 0].quantile(q)]}
    print(out, flush=True)
    return out


def registers(dev: torch.device) -> list[dict]:
    """Capped registers per thread (more one-warp programs resident per SM, one wave of them), CUDA-graph
    timed, against the default."""
    out = []
    g = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.float16, generator=g)
    sms = kernel._sm_count(dev)
    for preset in ("int8", "int4"):
        for t in (16384, 32768):
            first = bench.filled_layer(preset, B, H, t, D, dev)
            n = harness.rotation(bench.layer_bytes(first), dev)
            layers = [first] + [bench.filled_layer(preset, B, H, t, D, dev, seed=i) for i in range(1, n)]
            base = kernel.default_config(D, first.group, first.key_scheme, first.value_scheme, HQ // H)
            for regs in (None, 200, 168, 128):
                resident = 65536 // (32 * (regs or 255))
                cfg = replace(base, maxnreg=regs, num_splits=resident * sms // (B * H))
                for name, c in (("default", None), ("capped", cfg)) if regs is None else (("capped", cfg),):
                    samples, _ = harness.time_graph(lambda layer, c=c: decode(q, layer, config=c),
                                                    [(x,) for x in layers], 20)
                    row = {"preset": preset, "context": t, "maxnreg": regs, "config": name,
                           "splits": cfg.num_splits if c else "default",
                           "ms": round(harness.median(samples) * 1e3, 4)}
                    print(row, flush=True)
                    out.append(row)
            del layers, first
            torch.cuda.empty_cache()
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    slope, intercept = statistics.linear_regression(xs, ys)
    return intercept, slope


def main() -> None:
    global CONTEXTS, B
    dev = torch.device("cpu" if SMOKE else "cuda")
    if SMOKE:
        CONTEXTS, B = (64, 128, 256, 512), 1
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(B, HQ, 1, D, device=dev, dtype=torch.float16, generator=g)
    rows = []
    for preset in ("int8", "int4")[: 1 if SMOKE else 2]:
        for t in CONTEXTS:
            first = bench.filled_layer(preset, B, H, t, D, dev)
            n = harness.rotation(bench.layer_bytes(first), dev)
            layers = [first] + [bench.filled_layer(preset, B, H, t, D, dev, seed=i) for i in range(1, n)]
            base = kernel.default_config(D, first.group, first.key_scheme, first.value_scheme, HQ // H)
            splits, _ = kernel.choose_splits(t, B * H, base.block_n, dev, base.num_warps)
            slots = kernel.RESIDENT_PER_SM[base.num_warps] * kernel._sm_count(dev)
            one_wave = max(1, slots // (B * H))
            row = {"preset": preset, "context": t, "bytes": bench.layer_bytes(first),
                   "default_splits": splits}
            for name, cfg in (("default", None), ("one_wave", replace(base, num_splits=one_wave)),
                              ("two_waves", replace(base, num_splits=2 * one_wave)),
                              ("one_split", replace(base, num_splits=1))):
                ms = _time(lambda layer, c=cfg: decode(q, layer, config=c), [(x,) for x in layers])
                row[f"{name}_ms"] = round(ms, 4)
            row["profile"] = {k: round(v, 4) for k, v in _kernel_split(
                lambda layer: decode(q, layer), (first,)).items()}
            print(row, flush=True)
            rows.append(row)
            del layers, first
            torch.cuda.empty_cache()
    for t in CONTEXTS:
        kv = (B, H, t, D)
        n = harness.rotation(4 * B * H * t * D, dev)
        inputs = [(q, torch.randn(kv, device=dev, dtype=torch.float16, generator=g),
                   torch.randn(kv, device=dev, dtype=torch.float16, generator=g)) for _ in range(n)]
        ms = _time(lambda q, k, v: bench.sdpa_decode(q, k, v, packed=True), inputs)
        row = {"preset": "sdpa-fp16", "context": t, "bytes": 4 * B * H * t * D, "default_ms": round(ms, 4)}
        print(row, flush=True)
        rows.append(row)
        del inputs
        torch.cuda.empty_cache()
    lines, regs = [], []
    if not SMOKE:
        regs = registers(dev)
        for preset, t, splits in (("int8", 16384, None), ("int8", 16384, 32), ("int8", 32768, None),
                                  ("int4", 16384, None)):
            lines.append(timeline(preset, t, splits, dev))
    fits = {}
    for preset in ("int8", "sdpa-fp16") if SMOKE else ("int8", "int4", "sdpa-fp16"):
        mine = [r for r in rows if r["preset"] == preset and r["context"] >= CONTEXTS[2]]
        a, b = _fit([r["context"] for r in mine], [r["default_ms"] for r in mine])
        rate = (mine[-1]["bytes"] - mine[0]["bytes"]) / (mine[-1]["context"] - mine[0]["context"]) / (b / 1e3)
        fits[preset] = {"fixed_us": round(a * 1e3, 2), "us_per_1k_tokens": round(b * 1e6, 3),
                        "stream_gbps": round(rate / 1e9, 1)}
        print(preset, fits[preset])
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "decode_overhead.json"), "w") as f:
        name = "cpu" if SMOKE else torch.cuda.get_device_name()
        json.dump({"device": name, "torch": torch.__version__, "rows": rows,
                   "fits": fits, "timelines": lines, "registers": regs}, f, indent=1)


if __name__ == "__main__":
    main()
