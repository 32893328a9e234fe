"""The Markdown report of a ``kvpack bench`` run, written from its saved results (``results.json``)."""

from __future__ import annotations

from typing import Any

from kvpack.bench import harness, paper
from kvpack.bench.quant import ERROR_COLUMNS, best, error_rows, roundtrip_gbps

_GPU_LABELS = (
    "cuda-naive",
    "cuda-tiled",
    "cuda-coarsened",
    "cuda-vectorized",
    "cuda-grouped",
    "triton",
    "torch-eager",
    "torch-compile",
)


def _ok(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] == "ok" and r["backend"] != "copy"]


def _header(results: dict[str, Any]) -> list[str]:
    env, st = results["environment"], results["settings"]
    lines = [
        "# kvpack bench",
        "",
        f"- device: **{env['device_name']}** ({env['device']}); CPU: {env['cpu']} ({env['cpu_count']} cores, "
        f"torch uses {env['torch_threads']} threads; load average {env.get('load_average_1min')} at start)",
        f"- date (UTC): {env['date']}; wall time {env.get('seconds', '?')} s",
        f"- versions: python {env['python']}, torch {env['torch']}, cuda {env['cuda']}, "
        f"triton {env['triton']}, numba {env['numba']}, kvpack {env['kvpack']}; "
        f"git commit {env['git_commit']}",
        f"- inputs: {st['dist']}{' (U[-1, 1], as the paper)' if st['dist'] == 'uniform' else ''}, "
        f"seed {st['seed']}; format {st['format']}; configurations {', '.join(st['configs'])}",
        f"- timing: median of up to {st['repeats']} repeats per operation, each row held to about "
        f"{st['row_budget_s']} s of timed work (the `reps` column says how many ran); run budget "
        f"{str(st['budget_s']) + ' s' if st.get('budget_s') else 'none'} (see Skips)",
        "",
        "Bytes counted are the fewest each operation must move: scales read x once (and write the scales); "
        "quantize reads x once and writes codes and scales; dequantize reads codes and scales and writes the "
        "output; the copy reads and writes x. GB/s are 10^9 bytes per second. `quant/copy` is the quantize "
        "rate as a fraction of the measured copy rate of the same tensor on the same device. Speedups are "
        "quantize + dequantize time against the `cpu-scalar` baseline and against the vectorized CPU path "
        "(`torch` on the CPU), measured in this run.",
        "",
    ]
    return lines


def _times(rows: list[dict[str, Any]]) -> list[str]:
    ok = _ok(rows)
    cols = [
        "config",
        "backend",
        "device",
        "repeats",
        "scales_ms",
        "quantize_ms",
        "dequantize_ms",
        "total_ms",
        "exact",
    ]
    heads = [
        "config",
        "backend",
        "device",
        "reps",
        "scales ms",
        "quantize ms",
        "dequantize ms",
        "q + dq ms",
        "exact (codes, scales)",
    ]
    return ["## Times", "", harness.markdown_table(ok, cols, heads), ""]


def _bandwidth(rows: list[dict[str, Any]]) -> list[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    cols = [
        "config",
        "backend",
        "device",
        "scales_gbps",
        "quantize_gbps",
        "dequantize_gbps",
        "copy_gbps",
        "scales_of_copy",
        "quantize_of_copy",
        "dequantize_of_copy",
    ]
    heads = [
        "config",
        "backend",
        "device",
        "scales GB/s",
        "quantize GB/s",
        "dequantize GB/s",
        "copy GB/s",
        "scales/copy",
        "quant/copy",
        "deq/copy",
    ]
    return ["## Bandwidth", "", harness.markdown_table(ok, cols, heads), ""]


def _speedups(rows: list[dict[str, Any]]) -> list[str]:
    ok = _ok(rows)
    cols = [
        "config",
        "backend",
        "device",
        "total_ms",
        "speedup_vs_scalar",
        "speedup_vs_torch_cpu",
        "speedup_vs_columns",
    ]
    heads = [
        "config",
        "backend",
        "device",
        "q + dq ms",
        "x cpu-scalar",
        "x torch (CPU)",
        "x cpu-scalar-columns",
    ]
    lines = ["## Speedups", "", harness.markdown_table(ok, cols, heads), ""]
    if not any(r["backend"] == "cpu-scalar" for r in ok):
        lines += [
            "The `cpu-scalar` baseline did not run in this run (see Skips), so that column is empty.",
            "",
        ]
    return lines


def _errors(rows: list[dict[str, Any]]) -> list[str]:
    cols = ERROR_COLUMNS
    heads = [
        "config",
        "output of",
        "max abs",
        "bound scale/2",
        "within",
        "L2 (float64)",
        "relative L2",
        "SQNR dB",
        "attention error (16 q)",
        "attention error (1 q)",
    ]
    return [
        "## Errors",
        "",
        "From the reference's output; a backend whose codes, scales and output are bit-identical shares "
        "them (any other gets its own line). L2 is the Frobenius norm summed in float64. The attention error "
        "is the paper's mean over tokens of |q.k - q.k_hat|, averaged over 16 seeded U[-1, 1] queries, and "
        "for the first query alone as the paper did.",
        "",
        harness.markdown_table(error_rows(rows), cols, heads),
        "",
    ]


def _paper(rows: list[dict[str, Any]]) -> list[str]:
    """Our numbers beside the paper's logged run, for the configurations both have."""
    ours = error_rows(rows)
    table = []
    for p in paper.LOGGED:
        err = next((r for r in ours if r["config"] == p.config and r["dtype"] == "float32"), None)
        if err is None:
            continue
        scalar = best(rows, p.config, ("cpu-scalar",))
        columns = best(rows, p.config, ("cpu-scalar-columns",))
        torch_cpu = best([r for r in rows if r["device"] == "cpu"], p.config, ("torch",))
        gpu = best(rows, p.config, _GPU_LABELS)
        table.append(
            {
                "config": p.config,
                "paper_cpu": p.cpu_ms,
                "columns": columns and columns["total_ms"],
                "scalar": scalar and scalar["total_ms"],
                "torch_cpu": torch_cpu and torch_cpu["total_ms"],
                "paper_vec": p.vectorized_ms,
                "gpu": gpu and f"{gpu['total_ms']:.4g} ({gpu['backend']})",
                "paper_l2": p.l2_logged,
                "l2": err["l2_error"],
                "paper_attn": p.attention_error,
                "attn1": err["attention_error_1q"],
                "attn16": err["attention_error"],
            }
        )
    if not table:
        return []
    cols = [
        "config",
        "paper_cpu",
        "columns",
        "scalar",
        "torch_cpu",
        "paper_vec",
        "gpu",
        "paper_l2",
        "l2",
        "paper_attn",
        "attn1",
        "attn16",
    ]
    heads = [
        "config",
        "paper CPU ms",
        "cpu-scalar-columns ms",
        "cpu-scalar ms",
        "torch CPU ms",
        "paper vectorized ms",
        "best GPU ms",
        "paper L2 (float32 sum)",
        "L2 (float64)",
        "paper attn err",
        "attn err 1 q",
        "attn err 16 q",
    ]
    lines = [
        "## Beside the paper",
        "",
        "Quantize + dequantize times in ms. The paper's CPU loop walked the row-major matrix column by "
        "column (stride D), which is cache-hostile: `cpu-scalar-columns` walks it the same way, `cpu-scalar` "
        "row by row. The paper's L2 was summed in "
        "float32 and under-reports at large sizes; ours is summed in float64. Our inputs are seeded, the "
        "paper's were not, so the attention errors agree in size, not digit for digit.",
        "",
        harness.markdown_table(table, cols, heads),
        "",
    ]
    return lines + _bandwidth_vs_paper(rows)


def _bandwidth_vs_paper(rows: list[dict[str, Any]]) -> list[str]:
    """Fractions of each GPU's bandwidth: the paper's (of about 250 GB/s) and ours (of the measured copy)."""
    table = []
    for p in paper.LOGGED:
        for variant in paper.VARIANTS:
            mine = best(rows, p.config, (f"cuda-{variant}",))
            if mine is None:
                continue
            copy = next(
                (
                    r["copy_gbps"]
                    for r in rows
                    if r["backend"] == "copy" and r["config"] == p.config and r["device"] == mine["device"]
                ),
                None,
            )
            ours = roundtrip_gbps(mine)
            # the paper computed its scales on the host, untimed: our quantize minus our scale kernel
            untimed = mine["total_ms"] - (mine["scales_ms"] or 0.0)
            nbytes = paper.roundtrip_bytes(p.tokens, p.channels)
            table.append(
                {
                    "config": p.config,
                    "variant": variant,
                    "paper_ms": p.variant_ms(variant),
                    "paper_frac": paper.gbps(p, variant) / paper.PAPER_GPU_GBPS,
                    "ms": mine["total_ms"],
                    "frac": ours / copy if ours and copy else None,
                    "ms_noscales": untimed,
                    "frac_noscales": nbytes / (untimed / 1e3) / 1e9 / copy if copy and untimed > 0 else None,
                }
            )
    if not table:
        return []
    cols = ["config", "variant", "paper_ms", "paper_frac", "ms", "frac", "ms_noscales", "frac_noscales"]
    heads = [
        "config",
        "variant",
        "paper q + dq ms",
        f"paper: of ~{paper.PAPER_GPU_GBPS:g} GB/s",
        "ours ms",
        "ours: of measured copy",
        "ours without the scale kernel, ms",
        "of measured copy",
    ]
    lines = [
        "### The paper's four variants, as fractions of each GPU's bandwidth",
        "",
        "The GPUs differ, so the comparison is the fraction of each one's memory bandwidth reached by "
        "quantize + dequantize (bytes as in the paper's setting: 10 bytes per float32 element). The paper "
        "computed its scales on the CPU and did not time them; ours are a GPU reduction inside quantize, "
        "so the last two columns take the scale kernel's time out, as the paper's setting did.",
        "",
        harness.markdown_table(table, cols, heads),
        "",
    ]
    return lines + _conclusions(rows)


def _conclusions(rows: list[dict[str, Any]]) -> list[str]:
    """Whether the paper's two conclusions hold here, from the measured rows."""
    lines = ["### The paper's conclusions, measured here", ""]
    variants = tuple(f"cuda-{v}" for v in paper.VARIANTS)
    for config in dict.fromkeys(r["config"] for r in rows):
        fastest = best(rows, config, variants)
        naive = best(rows, config, ("cuda-naive",))
        tiled = best(rows, config, ("cuda-tiled",))
        if fastest is None:
            continue
        text = f"- {config}: fastest of the four is `{fastest['backend']}` ({fastest['total_ms']:.4g} ms)"
        if naive and tiled:
            text += f"; tiled / naive time = {tiled['total_ms'] / naive['total_ms']:.3f}"
        lines.append(text)
    lines += [
        "",
        "(Vectorized best: holds where it is the fastest; tiling useless: holds where tiled / naive >= 1.)",
        "",
    ]
    return lines


def _phases(results: dict[str, Any]) -> list[str]:
    """Where each configuration's wall time went (inputs, the reference's error metrics, in all)."""
    phases = results.get("phases") or []
    if not phases:
        return []
    cols = ["config", "dtype", "input_s", "reference_metrics_s", "total_s"]
    heads = ["config", "dtype", "input generation s", "error metrics s", "configuration total s"]
    return ["## Where the time went", "", harness.markdown_table(phases, cols, heads), ""]


def _skips(results: dict[str, Any]) -> list[str]:
    lines = ["## Skips and errors", ""]
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append(f"- {r['status']}: {r['config']} `{r['backend']}` on {r['device']}: {r['reason']}")
    for s in results["skipped_backends"]:
        lines.append(f"- not measured: `{s['backend']}`: {s['reason']}")
    if len(lines) == 2:
        lines.append("- none")
    return lines + [""]


def bench_report(results: dict[str, Any], notes: list[str]) -> str:
    """The whole report as Markdown. ``notes``: plot file names written (or why none were)."""
    rows = results["rows"]
    lines = _header(results)
    lines += (
        _times(rows)
        + _bandwidth(rows)
        + _speedups(rows)
        + _errors(rows)
        + _paper(rows)
        + _phases(results)
        + _skips(results)
    )
    pngs = [n for n in notes if n.endswith(".png")]
    if pngs:
        lines += ["## Plots", ""] + [f"![{n}]({n})" for n in pngs] + [""]
    lines += [f"- {n}" for n in notes if not n.endswith(".png")]
    return "\n".join(lines).rstrip() + "\n"
