"""``kvpack accuracy``: every format's error on one shape, for several input distributions, side by side.

Each distribution is quantized in the role it plays in attention: ``keys`` (Gaussian with outlier
channels) and the paper's ``uniform`` and ``gaussian`` inputs as keys, ``values`` (Gaussian with
outlier tokens) as values. The partner tensor (values for keys, keys for values) is a fresh Gaussian
kept in full precision, and the queries are 16 seeded Gaussian vectors.

Metrics (float64, :mod:`kvpack.metrics`): max abs error, relative L2, SQNR, the paper's attention-score
error mean |q.k - q.k_hat| (keys only), the relative error of the attention output softmax(q K^T / sqrt(D)) V,
and the KL divergence of the attention distribution (keys only: quantized values leave it unchanged).
The findings compare each per-channel format with its per-token twin on the measured numbers.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from kvpack import metrics
from kvpack.bench import harness
from kvpack.ops import roundtrip
from kvpack.schemes import PRESETS, parse

_QUERIES = 16
_DEFAULT_OUT = "kvpack-results"

#: Matched (per-channel, per-token) formats: same type and bits, the usual group sizes of each axis.
PAIRS: tuple[tuple[str, str], ...] = (
    ("int8-channel", "int8-token"),
    ("int8-channel-g64", "int8-token-g32"),
    ("int4-channel", "int4-token"),
    ("int4-channel-g64", "int4-token-g32"),
    ("int2-channel-g64", "int2-token-g32"),
    ("fp8-e4m3-channel", "fp8-e4m3"),
)

_COLUMNS = [
    "format",
    "bytes_per_element",
    "max_abs_error",
    "relative_l2_error",
    "sqnr_db",
    "attention_score_error",
    "attention_output_error",
    "attention_kl",
]
_HEADERS = [
    "format",
    "bytes/elem",
    "max abs",
    "rel L2",
    "SQNR dB",
    "attn score err",
    "attn out err",
    "attn KL",
]


def role(dist: str) -> str:
    """``values`` is quantized as the value tensor; every other distribution as the key tensor."""
    return "values" if dist == "values" else "keys"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvpack accuracy``."""
    parser.description = (
        "Error metrics of every preset format on one shape, for the paper's uniform inputs, Gaussian inputs, "
        "keys with outlier channels and values with outlier tokens (each quantized in its attention role). "
        "Prints the tables and which scale axis wins for keys and for values, and writes accuracy.json, "
        "accuracy.csv, accuracy.md and accuracy.png to --out."
    )
    parser.add_argument("--shape", default="4096x128", help="[BATCHx]TOKENSxCHANNELS (default 4096x128)")
    parser.add_argument(
        "--dist",
        default="uniform,gaussian,keys,values",
        help="comma-separated distributions: uniform (U[-1, 1]), gaussian, keys (outlier channels 20-100x; "
        "alias outliers), values (outlier tokens 20-100x) (default: all four)",
    )
    parser.add_argument(
        "--formats", help=f"comma-separated formats (default: the presets: {', '.join(PRESETS)})"
    )
    parser.add_argument("--dtype", default="float32", choices=list(harness.DTYPES), help="input dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and queries (default 0)")
    parser.add_argument("--backend", default="auto", help="backend that quantizes (default auto)")
    parser.add_argument("--device", default="cpu", help="device to quantize on (default cpu)")
    parser.add_argument("--out", default=_DEFAULT_OUT, help=f"output folder (default {_DEFAULT_OUT}/)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw accuracy.png")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")


def measure(
    shape: tuple[int, ...],
    dist: str,
    formats: list[str],
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    backend: str = "auto",
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """One row of metrics per format for a seeded ``shape [..., T, D]`` input drawn from ``dist``."""
    dist = harness.parse_distribution(dist)
    d = shape[-1]
    x = harness.synthetic(shape, dist, dtype, seed).to(device)
    partner = harness.synthetic(shape, "gaussian", dtype, seed + 1).to(device)
    q = harness.synthetic((_QUERIES, d), "gaussian", torch.float32, seed + 2).to(device)
    flat = x.reshape(-1, d)
    is_key = role(dist) == "keys"
    rows = []
    for fmt in formats:
        scheme = parse(fmt)
        x_hat = roundtrip(x, scheme, backend).reshape(-1, d)
        rep = metrics.report(flat, x_hat, q if is_key else None)
        if is_key:
            out_err = metrics.attention_output_error(
                q, flat, partner.reshape(-1, d), x_hat, partner.reshape(-1, d)
            )
        else:
            k = partner.reshape(-1, d)
            out_err = metrics.attention_output_error(q, k, flat, k, x_hat)
        rows.append(
            {
                "dist": dist,
                "role": role(dist),
                "format": scheme.name,
                "shape": "x".join(map(str, shape)),
                "bytes_per_element": scheme.nbytes(tuple(shape)) / math.prod(shape),
                "max_abs_error": rep["max_abs_error"],
                "relative_l2_error": rep["relative_l2_error"],
                "sqnr_db": rep["sqnr_db"],
                "attention_score_error": rep.get("attention_score_error"),
                "attention_output_error": out_err,
                "attention_kl": metrics.attention_kl(q, flat, x_hat) if is_key else None,
            }
        )
    return rows


def findings(rows: list[dict[str, Any]]) -> list[str]:
    """For each distribution, which axis wins over the matched pairs, from the measured numbers."""
    lines = []
    for dist in dict.fromkeys(r["dist"] for r in rows):
        by_fmt = {r["format"]: r for r in rows if r["dist"] == dist}
        names = [(parse(c).name, parse(t).name) for c, t in PAIRS]
        pairs = [(by_fmt[c], by_fmt[t]) for c, t in names if c in by_fmt and t in by_fmt]
        if not pairs:
            continue
        l2 = sum(c["relative_l2_error"] < t["relative_l2_error"] for c, t in pairs)
        att = sum(c["attention_output_error"] < t["attention_output_error"] for c, t in pairs)
        winner = (
            "per-channel" if l2 * 2 > len(pairs) else "per-token" if l2 * 2 < len(pairs) else "neither axis"
        )
        c0, t0 = pairs[0]
        lines.append(
            f"{dist} (quantized as {role(dist)}): {winner} scales win. Per-channel has the lower relative L2 "
            f"error in {l2} of {len(pairs)} matched pairs and the lower attention-output error in {att} of "
            f"{len(pairs)} (e.g. {c0['format']} vs {t0['format']}: relative L2 "
            f"{c0['relative_l2_error']:.3g} vs {t0['relative_l2_error']:.3g}, attention output "
            f"{c0['attention_output_error']:.3g} vs {t0['attention_output_error']:.3g})."
        )
    return lines


def _markdown(results: dict[str, Any], notes: list[str]) -> str:
    env, st = results["environment"], results["settings"]
    lines = [
        "# kvpack accuracy",
        "",
        f"- shape {st['shape']}, dtype {st['dtype']}, seed {st['seed']}, backend {st['backend']}; "
        f"{env['device_name']}; {env['date']}; kvpack {env['kvpack']}, torch {env['torch']}",
        "- keys: Gaussian with max(1, D/32) outlier channels 20-100x larger; values: Gaussian with "
        "max(1, T/64) outlier tokens 20-100x larger; uniform: U[-1, 1] as the paper. Attention metrics use "
        "16 seeded Gaussian queries and a full-precision Gaussian partner tensor.",
        "",
        "## Findings (from the numbers below)",
        "",
        *[f"- {f}" for f in results["findings"]],
        "",
    ]
    for dist in dict.fromkeys(r["dist"] for r in results["rows"]):
        part = [r for r in results["rows"] if r["dist"] == dist]
        lines += [
            f"## {dist} (quantized as {role(dist)})",
            "",
            harness.markdown_table(part, _COLUMNS, _HEADERS),
            "",
        ]
    lines += [f"![{n}]({n})" for n in notes if n.endswith(".png")]
    lines += [f"- {n}" for n in notes if not n.endswith(".png")]
    return "\n".join(lines).rstrip() + "\n"


def run(args: argparse.Namespace) -> int:
    """``kvpack accuracy``: measure, write the files, print the tables (or JSON)."""
    shape = harness.parse_shape(args.shape, dims=None)
    dists = [harness.parse_distribution(d.strip()) for d in args.dist.split(",") if d.strip()]
    if not dists:
        raise ValueError("--dist names no distribution")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else list(PRESETS)
    for f in formats:
        parse(f)
    dtype = harness.parse_dtype(args.dtype)
    device = torch.device(args.device)
    rows = []
    for dist in dists:
        rows += measure(shape, dist, formats, dtype, args.seed, args.backend, device)
    results = {
        "kind": "kvpack-accuracy",
        "environment": harness.environment(device),
        "settings": {
            "shape": args.shape,
            "dtype": args.dtype,
            "seed": args.seed,
            "backend": args.backend,
            "dists": dists,
            "formats": formats,
            "queries": _QUERIES,
        },
        "findings": findings(rows),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "accuracy.json", results)
    harness.write_csv(out / "accuracy.csv", rows)
    notes = []
    if not args.no_plots:
        from kvpack.bench import plots

        notes = plots.accuracy_plot(results, out)
    (out / "accuracy.md").write_text(_markdown(results, notes))
    if args.json:
        print(harness.json_text(results))
        return 0
    for dist in dists:
        print(f"\n{dist} (quantized as {role(dist)}), shape {args.shape}:")
        print(harness.text_table([r for r in rows if r["dist"] == dist], _COLUMNS, _HEADERS))
    print()
    for line in results["findings"]:
        print(line)
    for note in notes:
        if not note.endswith(".png"):
            print(note)
    print(f"\nwrote {out}/accuracy.json, accuracy.csv, accuracy.md")
    return 0
