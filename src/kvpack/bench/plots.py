"""PNG plots drawn from saved results (``results.json`` / ``accuracy.json``); matplotlib is imported lazily.

Each function returns notes: the file names it wrote, or a sentence saying why it drew nothing.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

from kvpack.bench import paper

_NO_MATPLOTLIB = "matplotlib is not installed (pip install 'kvpack[plots]'): no plots were drawn"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(rows: list[dict[str, Any]], key: str) -> dict[str, list[tuple[float, float]]]:
    """(elements, value) points per backend/device, for rows that have ``key``."""
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        if r["status"] == "ok" and r.get(key) is not None:
            out[f"{r['backend']} ({r['device']})"].append((r["elements"], r[key]))
    return {k: sorted(v) for k, v in out.items()}


def _lines(ax: Any, series: dict[str, list[tuple[float, float]]]) -> None:
    for label, pts in series.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)


def _panels(
    plt: Any,
    rows: list[dict[str, Any]],
    panels: tuple[tuple[str, str], ...],
    ylabel: str,
    log: bool,
    title: str,
    path: Path,
) -> None:
    """Side-by-side panels, one per (row key, panel title), each a line per backend against size."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5))
    for ax, (key, name) in zip(axes, panels, strict=True):
        _lines(ax, _series(rows, key))
        ax.set(xscale="log", yscale="log" if log else "linear", xlabel="elements", ylabel=ylabel, title=name)
        if log:
            ax.axhline(1.0, color="gray", lw=0.8)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _title(results: dict[str, Any]) -> str:
    env, st = results["environment"], results["settings"]
    return f"{st['format']}, {st['dist']} input, on {env['device_name']} ({env['date'][:10]})"


def bench_plots(results: dict[str, Any], out: Path) -> list[str]:
    """time.png, speedup.png, bandwidth.png and error.png of a ``kvpack bench`` run."""
    try:
        plt = _pyplot()
    except ImportError:
        return [_NO_MATPLOTLIB]
    rows = results["rows"]
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    _lines(ax, _series(rows, "total_ms"))
    for variant, style in (("cpu", "k--"), ("vectorized", "k:")):
        pts = [(p.tokens * p.channels, p.variant_ms(variant)) for p in paper.LOGGED]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"paper, {variant} (logged)")
    ax.set(
        xscale="log", yscale="log", xlabel="elements (tokens x channels)", ylabel="quantize + dequantize, ms"
    )
    ax.set_title(f"Time vs size: {_title(results)}", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "time.png", dpi=120)
    written.append("time.png")
    plt.close(fig)

    for name, panels, ylabel, log in (
        (
            "speedup.png",
            (
                ("speedup_vs_scalar", "Speedup over cpu-scalar"),
                ("speedup_vs_torch_cpu", "Speedup over torch (CPU)"),
            ),
            "speedup (q + dq time)",
            True,
        ),
        (
            "bandwidth.png",
            (("quantize_of_copy", "quantize / copy"), ("dequantize_of_copy", "dequantize / copy")),
            "fraction of copy bandwidth",
            False,
        ),
    ):
        _panels(plt, rows, panels, ylabel, log, _title(results), out / name)
        written.append(name)

    errs = sorted(
        (
            r
            for r in rows
            if r["status"] == "ok" and r.get("metrics_from") == "own output" and r["backend"] != "copy"
        ),
        key=lambda r: (r["channels"], r["tokens"]),
    )
    if errs:
        fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
        labels = [f"{r['config']}" for r in errs]
        xs = range(len(errs))
        logged = [paper.lookup(r["tokens"], r["channels"]) for r in errs]
        axes[0].plot(xs, [r["l2_error"] for r in errs], "o-", label="kvpack (float64 sum)")
        axes[0].plot(
            xs, [p.l2_logged if p else None for p in logged], "s--", label="paper (float32 sum, logged)"
        )
        axes[0].set(ylabel="L2 error ||x - x_hat||_F", title="L2 error")
        axes[1].plot(xs, [r["max_abs_error"] for r in errs], "o-", label="max |x - x_hat|")
        axes[1].plot(xs, [r["bound"] for r in errs], "k--", label="bound scale/2")
        axes[1].set(ylabel="max abs error", title="Max abs error and its bound")
        axes[1].ticklabel_format(axis="y", useOffset=False)
        axes[2].plot(xs, [r["attention_error"] for r in errs], "o-", label="16 queries")
        axes[2].plot(xs, [r["attention_error_1q"] for r in errs], "^-", label="1 query")
        axes[2].plot(xs, [p.attention_error if p else None for p in logged], "s--", label="paper (1 query)")
        axes[2].set(ylabel="mean |q.k - q.k_hat|", title="Attention-score error")
        for ax in axes:
            ax.set_xticks(list(xs), labels, rotation=45, ha="right", fontsize=7)
            ax.set_xlabel("configuration (tokens x D), by D")
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"Error vs D: {_title(results)}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "error.png", dpi=120)
        written.append("error.png")
        plt.close(fig)
    return written


def accuracy_plot(results: dict[str, Any], out: Path) -> list[str]:
    """accuracy.png: relative L2 and attention-output error per format, one group per distribution."""
    try:
        plt = _pyplot()
    except ImportError:
        return [_NO_MATPLOTLIB]
    rows = results["rows"]
    dists = list(dict.fromkeys(r["dist"] for r in rows))
    formats = list(dict.fromkeys(r["format"] for r in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 0.9 * len(formats) + 3), 8), sharex=True)
    width = 0.8 / max(len(dists), 1)
    for ax, key, name in (
        (axes[0], "relative_l2_error", "relative L2 error"),
        (axes[1], "attention_output_error", "attention output error (relative)"),
    ):
        for i, dist in enumerate(dists):
            vals = {r["format"]: r[key] for r in rows if r["dist"] == dist}
            ax.bar(
                [j + i * width for j in range(len(formats))],
                [vals.get(f) or 0.0 for f in formats],
                width,
                label=dist,
            )
        ax.set(yscale="log", ylabel=name)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, title="distribution")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(formats))], formats, rotation=45, ha="right")
    st = results["settings"]
    fig.suptitle(f"kvpack accuracy: shape {st['shape']}, seed {st['seed']} (lower is better)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)
    return ["accuracy.png"]
