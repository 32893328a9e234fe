"""The int4 decode kernels on a GPU: the CUDA C kernel (and builds of it capped to more resident
programs per SM) against the Triton kernel and float16 SDPA.

Batch 8, 32 query / 8 KV heads, head dim 128, contexts 4K to 128K; each call timed as CUDA graph
replays over inputs rotated past L2 (as ``kvpack bench-attention``). Prints ms, GB/s on the bytes the
int4 layer holds, the fraction of the measured copy bandwidth, and the speedup over SDPA; with
``--profile``, one call's kernels under the profiler (decode kernel and combine kernel apart).

    python benchmarks/decode_int4.py [--min-blocks 1,10,12] [--contexts 16384,32768]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from dataclasses import replace
from pathlib import Path

import torch

from kvpack.attention import decode
from kvpack.bench import attention as bench
from kvpack.bench import harness
from kvpack.cuda import decode as cuda_decode
from kvpack.cuda import pasted
from kvpack.triton.attention import default_config

B, HQ, H, D = 8, 32, 8, 128


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


_MODULES: dict = {}  # the last build's CuPy modules by (kernel, device)


def _build(defines: dict[str, int]) -> None:
    """Make the CUDA kernel loader compile with these macros (``KVPACK_DECODE_MIN_BLOCKS``: programs per
    SM the registers must allow; ``KVPACK_DECODE_TIMELINE``: each program's timestamps)."""
    import cupy

    options = ("-std=c++17", *(f"-D{k}={v}" for k, v in defines.items()))
    _MODULES.clear()

    @functools.cache
    def kernel(name: str, device_index: int):  # noqa: ANN202
        with cupy.cuda.Device(device_index):
            module = cupy.RawModule(code=pasted(cuda_decode.SOURCE), options=options)
            _MODULES[(name, device_index)] = module
            kernel = module.get_function(name)
            cuda_decode.prefer_shared_memory(kernel)
            return kernel

    cuda_decode._kernel = kernel
    cuda_decode.resident_per_sm.cache_clear()


def timeline(call, ctx: int) -> dict:  # noqa: ANN001
    """One call of a timeline build: per program its start, prologue end, loop end and end (us from the
    first start) and SM; prints their spread."""
    import numpy as np

    _build({"KVPACK_DECODE_TIMELINE": 1})
    call()
    torch.cuda.synchronize()
    call()
    torch.cuda.synchronize()
    (module,) = _MODULES.values()
    import cupy

    stamps = cupy.ndarray((5 * 16384,), dtype=cupy.uint64, memptr=module.get_global("kvpack_timeline"))
    raw = stamps.get().reshape(-1, 5)
    raw = raw[raw[:, 0] != 0]  # the programs of the grid (the global starts zeroed)
    n = len(raw)
    t = (raw[:, :4].astype(np.int64) - int(raw[:, 0].min())) / 1e3
    sm = raw[:, 4].astype(np.int64)
    per_sm = np.bincount(sm)
    q = lambda x: " ".join(f"{v:6.1f}" for v in np.percentile(x, [0, 10, 50, 90, 100]))  # noqa: E731
    print(f"{ctx:>7} timeline {n} programs on {np.count_nonzero(per_sm)} SMs, "
          f"{per_sm.min()}-{per_sm.max()} per SM (us: min p10 p50 p90 max)")
    for name, x in [("start", t[:, 0]), ("prologue", t[:, 1] - t[:, 0]), ("tiles", t[:, 2] - t[:, 1]),
                    ("finish", t[:, 3] - t[:, 2]), ("end", t[:, 3])]:
        print(f"{ctx:>7} timeline {name:<9} {q(x)}")
    crowded = per_sm[sm] == per_sm.max()
    print(f"{ctx:>7} timeline end on SMs with {per_sm.max()}: {q(t[crowded, 3])}; others: "
          f"{q(t[~crowded, 3]) if (~crowded).any() else '-'}")
    _build({})
    return dict(context=ctx, programs=n, start=t[:, 0].tolist(), prologue_end=t[:, 1].tolist(),
                tiles_end=t[:, 2].tolist(), end=t[:, 3].tolist(), sm=sm.tolist())


def profile(call, ctx: int) -> None:  # noqa: ANN001
    """Each kernel's mean GPU time over 20 calls under the profiler."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    call()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            call()
        torch.cuda.synchronize()
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" and e.count >= 20:
            print(f"{ctx:>7} profile {e.key[:40]:<40} {e.device_time_total / e.count:.1f} us x {e.count}")


def graph_trace(fn, inputs, label: str, out: Path) -> dict:  # noqa: ANN001
    """The GPU operations of one replay of ``fn`` over ``inputs`` captured as a CUDA graph (as the timing
    replays it), from the profiler's trace: per kind of operation its median duration, and the median
    idle gap before it (from the end of the operation before), in us."""
    import statistics

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    graph, _ = harness.capture_graph(fn, inputs)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    path = out / f"trace-{label}.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())["traceEvents"]
    ops = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memset", "gpu_memcpy")),
                 key=lambda e: e["ts"])
    if not ops:
        print(f"{label}: no GPU operations in the trace", flush=True)
        return {"label": label}
    kinds: dict[str, dict[str, list]] = {}
    for before, e in zip([None, *ops[:-1]], ops, strict=True):
        name = e["name"][:40]
        k = kinds.setdefault(name, {"dur": [], "gap": []})
        k["dur"].append(e["dur"])
        if before is not None:
            k["gap"].append(e["ts"] - before["ts"] - before["dur"])
    span = ops[-1]["ts"] + ops[-1]["dur"] - ops[0]["ts"]
    summary = {name: {"n": len(k["dur"]), "dur_us": statistics.median(k["dur"]),
                      "gap_before_us": statistics.median(k["gap"]) if k["gap"] else None}
               for name, k in kinds.items()}
    print(f"{label}: one replay of {len(inputs)} calls, {span / len(inputs):.1f} us per call", flush=True)
    for name, v in summary.items():
        print(f"  {name:<40} x{v['n']:<3} {v['dur_us']:7.1f} us, gap before {v['gap_before_us']} us")
    del graph
    return {"label": label, "us_per_call": span / len(inputs), "ops": summary}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", type=_ints, default=[4096, 16384, 32768, 131072])
    p.add_argument("--min-blocks", type=_ints, default=[12, 8])
    p.add_argument(
        "--splits", type=_ints, default=[], help="also time the default build at these split counts"
    )
    p.add_argument(
        "--profile", action="store_true", help="kernel times of the default path under the profiler"
    )
    p.add_argument(
        "--static", action="store_true",
        help="also time the CUDA kernel with fixed chunks (no shared counter): cuda-static",
    )
    p.add_argument("--set", action="append", default=[],
                   help="also time a variant with these kvpack.cuda.decode settings and decode.cu macros, "
                        "NAME=INT[,NAME=INT] (repeatable; e.g. SHARE_TILES=0,KVPACK_DECODE_MIN_BLOCKS=8)")
    p.add_argument("--define", action="append", default=[],
                   help="also time a build of decode.cu with this macro, NAME=VALUE (repeatable)")
    p.add_argument("--preset", default="int4", help="cache preset (int4; others run the Triton kernel only)")
    p.add_argument(
        "--timeline", action="store_true", help="each program's timestamps in one call of the default path"
    )
    p.add_argument(
        "--trace", action="store_true",
        help="the kernels of one CUDA-graph replay under the profiler: durations, gaps (SDPA, default path)",
    )
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    dev = torch.device("cuda")
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    samples, _ = harness.time_calls(dst.copy_, [(src,)], 20, dev)
    copy = 2 * n / harness.median(samples) / 1e9
    del src, dst
    print(f"copy {copy:.0f} GB/s")

    def ms(fn, inputs) -> float:  # noqa: ANN001
        samples, _ = harness.time_graph(fn, inputs, args.repeats)  # per call
        return harness.median(samples) * 1e3

    rows, timelines, traces = [], [], []
    g = torch.Generator(device=dev).manual_seed(1)
    q = torch.randn(B, HQ, 1, D, generator=g, device=dev, dtype=torch.float16)
    for ctx in args.contexts:
        fp16 = 2 * B * H * ctx * D * 2
        copies = max(1, harness.rotation(fp16, dev))
        kv = [
            (
                torch.randn(B, H, ctx, D, generator=g, device=dev, dtype=torch.float16),
                torch.randn(B, H, ctx, D, generator=g, device=dev, dtype=torch.float16),
            )
            for _ in range(copies)
        ]
        sdpa = ms(lambda k, v: bench.sdpa_decode(q, k, v, True), kv)
        if args.profile:
            profile(functools.partial(bench.sdpa_decode, q, *kv[0], True), ctx)
        if args.trace:
            traces.append(graph_trace(lambda k, v: bench.sdpa_decode(q, k, v, True), kv, f"sdpa-{ctx}",
                                      Path(args.out)))
        del kv
        torch.cuda.empty_cache()
        first = bench.filled_layer(args.preset, B, H, ctx, D, dev)
        nbytes = bench.layer_bytes(first)
        layers = [first] + [
            bench.filled_layer(args.preset, B, H, ctx, D, dev, seed=i)
            for i in range(1, max(1, harness.rotation(nbytes, dev)))
        ]
        base = default_config(D, first.group, first.key_scheme, first.value_scheme, HQ // H)
        keys, values = first.dequantized()
        ref = bench.sdpa_decode(q, keys, values, True)
        del keys, values
        # (label, config, macros of the build (None: Triton), settings of kvpack.cuda.decode)
        variants = [("triton", replace(base, kernel="triton"), None, {})]
        variants += [(f"cuda-minblocks{m}", base, {"KVPACK_DECODE_MIN_BLOCKS": m}, {})
                     for m in args.min_blocks]
        variants += [(f"cuda-splits{n}", replace(base, num_splits=n), {}, {}) for n in args.splits]
        for text in args.set:  # loader settings, and decode.cu macros (KVPACK_...)
            changes = {k: int(v) for k, v in (kv.split("=") for kv in text.split(","))}
            label = "cuda-" + "-".join(f"{k.removeprefix('KVPACK_DECODE_').lower()}{v}"
                                       for k, v in changes.items())
            macros = {k: v for k, v in changes.items() if k.startswith("KVPACK_")}
            variants += [(label, base, macros, {k: v for k, v in changes.items() if k not in macros})]
        for d in args.define:
            name, value = d.split("=")
            label = f"cuda-{name.removeprefix('KVPACK_DECODE_').lower()}{value}"
            variants += [(label, base, {name: int(value)}, {})]
        if args.static:
            variants += [("cuda-static", base, {}, {"SHARE_TILES": False})]
        if args.preset != "int4":  # the Triton kernel only, at the default and any forced split counts
            forced = [replace(base, kernel="triton", num_splits=n) for n in args.splits]
            variants = variants[:1] + [(f"triton-splits{c.num_splits}", c, None, {}) for c in forced]
        settings = {k: getattr(cuda_decode, k) for k in ("SHARE_TILES",)}
        for name, config, defines, changes in variants:
            if defines is not None:
                _build(defines)
            for k, v in {**settings, **changes}.items():
                setattr(cuda_decode, k, v)
            t = ms(lambda layer, c=config: decode(q, layer, config=c), [(layer,) for layer in layers])
            err = bench._rel_error(decode(q, first, config=config), ref)
            per_sm = cuda_decode.resident_per_sm(D, torch.float16, 0) if defines is not None else None
            row = dict(
                context=ctx,
                method=name,
                ms=t,
                sdpa_ms=sdpa,
                speedup=sdpa / t,
                bytes=nbytes,
                gbps=nbytes / t / 1e6,
                of_copy=nbytes / t / 1e6 / copy,
                rel_error=err,
                per_sm=per_sm,
            )
            row.update({k.lower(): getattr(cuda_decode, k) for k in settings})
            rows.append(row)
            print(
                f"{ctx:>7} {name:<16} {t:.4f} ms  SDPA {sdpa:.4f}  x{sdpa / t:.2f}  "
                f"{row['gbps']:.0f} GB/s ({row['of_copy']:.0%})  err {err:.1e}  per_sm {per_sm}",
                flush=True,
            )
        for k, v in settings.items():
            setattr(cuda_decode, k, v)
        if args.profile:
            _build({})
            profile(functools.partial(decode, q, first), ctx)
        if args.trace:
            traces.append(graph_trace(lambda layer: decode(q, layer), [(layer,) for layer in layers],
                                      f"{args.preset}-{ctx}", Path(args.out)))
        if args.timeline:
            timelines.append(timeline(functools.partial(decode, q, first), ctx))
        del layers, first
        torch.cuda.empty_cache()
    out = Path(args.out) / "decode_int4.json"
    out.write_text(json.dumps(dict(harness.environment(dev), copy_gbps=copy, rows=rows, timelines=timelines,
                                   traces=traces)))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
