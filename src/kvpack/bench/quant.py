"""``kvpack bench``: the paper's quantize / dequantize study on whatever device is present.

For each configuration (tokens x channels) and backend it measures the scale computation, quantize
(scales included) and dequantize, and reports median times, GB/s, speedups over the CPU baselines,
exactness against the plain-torch reference, and the error metrics.

Bytes counted, the fewest each operation must move (N elements, S bytes of scales and zero points):

- scales: read x once, write the scales: ``N * itemsize + S``;
- quantize: read x once, write codes and scales: ``N * itemsize + codes + S``;
- dequantize: read codes and scales, write the output: ``codes + S + N * itemsize``;
- copy (the bandwidth ceiling, ``dst.copy_(x)``): read and write x: ``2 * N * itemsize``.

The plain-torch reference (row ``torch`` on the CPU, ``torch-eager`` on a GPU) always runs: it defines
exactness (codes and scales bit-equal) and the error metrics. Another backend whose outputs are
identical to the reference's shares its metrics; one whose outputs differ gets its own. The backends'
own functions are timed (the public API's input checks are not part of the timed work).

Budgets: each row's timed work is held to ``--row-budget`` seconds: repeats are cut (to no fewer than
one) to fit, and a backend other than the reference whose single repetition is predicted (from the
previous configuration, or a small warm-up) to take longer is skipped at that configuration. On the
CPU the whole run also has a ``--budget`` (180 s by default): the reference and the metrics run at
every configuration, and another row runs only if one repetition fits in the time left after keeping
the reference's predicted share of the configurations still to come. Every skip is a row with its
reason, in the table and the report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvpack import metrics, reference
from kvpack.backends import Backend, available, implementation, why_not
from kvpack.bench import harness, paper
from kvpack.schemes import Scheme, parse

_QUERIES = 16  # random queries averaged in the attention-score error
_WARMUP_ELEMENTS = 1 << 20  # size of the CPU warm-up slice (JIT compilation, per-element estimate)
_DEFAULT_OUT = "kvpack-results"
_CPU_BUDGET = 180.0  # default run budget on the CPU, seconds
_FIT_MIN_ELEMENTS = 1 << 22  # smallest configuration whose fixed cost helps predict larger ones
#: Rows predicted to take less than this fraction of the run budget are never skipped by it.
_CHEAP = 0.01


@dataclass
class Row:
    """One (configuration, backend) measurement. Times in ms, rates in GB/s (10^9 B/s)."""

    config: str
    tokens: int
    channels: int
    elements: int
    dtype: str
    dist: str
    format: str
    backend: str
    device: str
    status: str = "ok"
    reason: str | None = None
    repeats: int | None = None
    scales_ms: float | None = None
    quantize_ms: float | None = None
    dequantize_ms: float | None = None
    total_ms: float | None = None
    copy_ms: float | None = None
    scales_bytes: int | None = None
    quantize_bytes: int | None = None
    dequantize_bytes: int | None = None
    copy_bytes: int | None = None
    scales_gbps: float | None = None
    quantize_gbps: float | None = None
    dequantize_gbps: float | None = None
    copy_gbps: float | None = None
    scales_of_copy: float | None = None
    quantize_of_copy: float | None = None
    dequantize_of_copy: float | None = None
    speedup_vs_scalar: float | None = None
    speedup_vs_torch_cpu: float | None = None
    speedup_vs_columns: float | None = None
    exact: bool | None = None
    max_abs_error: float | None = None
    bound: float | None = None
    within_bound: bool | None = None
    l2_error: float | None = None
    relative_l2_error: float | None = None
    sqnr_db: float | None = None
    attention_error: float | None = None
    attention_error_1q: float | None = None
    metrics_from: str | None = None


@dataclass
class Runner:
    """A backend ready for one configuration: callables on 3-D ``[1, T, D]`` tensors (``scales`` is
    None where the scale computation cannot be timed on its own)."""

    label: str
    device: torch.device
    scales: Callable[[torch.Tensor], Any] | None
    quantize: Callable[[torch.Tensor], tuple]
    dequantize: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    reference: bool = False


@dataclass
class Settings:
    configs: list[tuple[int, int, torch.dtype]]
    dist: str
    scheme: Scheme
    seed: int
    repeats: int
    row_budget: float
    budget: float
    device: torch.device
    labels: list[str]
    skipped: list[dict[str, str]]


@dataclass
class _Output:
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    x_hat: torch.Tensor


# --------------------------------------------------------------------------------------------- options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvpack bench``."""
    parser.description = (
        "The paper's INT8 KV-cache quantization study on this machine (CUDA if present, else CPU): for "
        "each configuration and backend, the scale computation, quantize and dequantize times (medians), "
        "GB/s, speedups over the scalar CPU baseline and the vectorized CPU path, exactness against the "
        "plain-torch reference and the error metrics. On a GPU it also measures a device-to-device copy "
        "(the bandwidth ceiling) and the reference in torch eager and under torch.compile. Writes "
        "results.json, results.csv, report.md and PNG plots to --out."
    )
    configs = ",".join(f"{t}x{d}" for t, d in paper.CONFIGS)
    parser.add_argument(
        "--configs",
        default=configs,
        help=f"comma-separated TOKENSxCHANNELS (default: the paper's eight: {configs})",
    )
    parser.add_argument(
        "--large",
        action="store_true",
        help=f"also run {paper.LARGE[0]}x{paper.LARGE[1]} float16 (over 2^31 elements; needs a large GPU)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run: the three smallest paper configurations, 3 repeats"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=list(harness.DTYPES),
        help="input dtype (default float32, as the paper)",
    )
    parser.add_argument(
        "--dist",
        default="uniform",
        help="input distribution: uniform (U[-1, 1], the paper's), gaussian, keys or outliers (outlier "
        "channels), values (outlier tokens)",
    )
    parser.add_argument(
        "--format", default="int8-channel", help="quantization format (default int8-channel, the paper's)"
    )
    parser.add_argument(
        "--backends",
        help="comma-separated backends to measure (default: every available one for the format on the "
        "device, and torch-compile on a GPU; on a GPU 'torch' is the CPU path); the plain-torch reference "
        "always runs",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    parser.add_argument(
        "--no-cpu-baselines",
        action="store_true",
        help="on a GPU, do not measure the CPU baselines (torch on the CPU, cpu-scalar, cpu-scalar-columns)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the inputs and queries (default 0)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="most timed repetitions per operation (default 5)"
    )
    parser.add_argument(
        "--row-budget",
        type=float,
        default=10.0,
        help="seconds of timed work per row (default 10): repeats are cut to fit, and a backend other than "
        "the reference whose single repetition is predicted to take longer is skipped at that size",
    )
    parser.add_argument(
        "--budget",
        type=float,
        help=f"seconds for the whole run (default {_CPU_BUDGET:g} on the CPU, no limit on a GPU; 0: no "
        "limit). The reference and the error metrics run at every configuration; other rows are skipped, "
        "with the reason, where the time left (after keeping the reference's predicted share of the "
        "configurations still to come) cannot fit one repetition",
    )
    parser.add_argument("--out", default=_DEFAULT_OUT, help=f"output folder (default {_DEFAULT_OUT}/)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    parser.add_argument(
        "--from",
        dest="from_results",
        metavar="RESULTS_JSON",
        help="measure nothing: write report.md and the plots again from a saved results.json (into its "
        "folder, or --out)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU here")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"kvpack bench runs on cpu or cuda, not {device.type}")
    return device


#: Rows that are not kvpack backends: the reference on a GPU, eagerly and compiled, and the paper's
#: column-by-column CPU walk (``kvpack.baseline.quantize_column_major``).
_EXTRA = ("torch-eager", "torch-compile", "cpu-scalar-columns")
#: Rows that run on the CPU whatever the benchmark's device.
_CPU_LABELS = ("torch", "cpu-scalar", "cpu-scalar-columns")


def _labels(
    requested: str | None, scheme: Scheme, device: torch.device
) -> tuple[list[str], list[dict[str, str]]]:
    """The row labels to measure (the reference first), and the backends left out with the reason."""
    on_gpu = device.type == "cuda"
    names = [b.value for b in Backend if b != Backend.AUTO] + list(_EXTRA)
    skipped: list[dict[str, str]] = []
    if requested:
        wanted = [w.strip() for w in requested.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose from: {', '.join(names)}")
    else:
        wanted = [b.value for b in available(scheme, device)] + ["cpu-scalar", "cpu-scalar-columns"]
        if not on_gpu and Backend.TRITON.value in wanted:
            wanted.remove(Backend.TRITON.value)
            skipped.append(
                {
                    "backend": "triton",
                    "reason": "on the CPU Triton runs through its interpreter (a test tool, not timed); "
                    "name it in --backends to measure it anyway",
                }
            )
        if on_gpu:
            wanted += ["torch-compile", "torch"]
    labels = ["torch-eager" if on_gpu else "torch"]
    for name in [*wanted, *names]:
        if name in labels or any(s["backend"] == name for s in skipped):
            continue
        reason = _unavailable(name, scheme, device)
        if reason:
            skipped.append({"backend": name, "reason": reason})
        elif name in wanted:
            labels.append(name)
    return labels, skipped


def _row_device(label: str, device: torch.device) -> torch.device:
    return torch.device("cpu") if label in _CPU_LABELS else device


def _unavailable(label: str, scheme: Scheme, device: torch.device) -> str | None:
    if label in ("torch-eager", "torch-compile"):
        if device.type != "cuda":
            return f"{label} is measured on a GPU only (the CPU path is the 'torch' row)"
        if label == "torch-compile" and why_not(Backend.TRITON, scheme, device) is not None:
            return "torch.compile on a GPU needs triton: pip install 'kvpack[gpu]'"
        return None
    backend = Backend.CPU_SCALAR if label == "cpu-scalar-columns" else Backend(label)
    reason = why_not(backend, scheme, _row_device(label, device))
    if reason:
        return reason
    try:
        impl = implementation(backend)
    except ImportError as err:
        return f"{label} could not be loaded: {err}"
    if label == "cpu-scalar-columns" and not hasattr(impl, "quantize_column_major"):
        return "kvpack.baseline has no column-major loop (quantize_column_major)"
    return None


def _settings(args: argparse.Namespace) -> Settings:
    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if not args.row_budget > 0:
        raise ValueError(f"--row-budget must be positive, got {args.row_budget}")
    if args.budget is not None and args.budget < 0:
        raise ValueError(f"--budget must be 0 (no limit) or positive, got {args.budget}")
    dtype = harness.parse_dtype(args.dtype)
    if args.quick:
        pairs = list(paper.CONFIGS[:3])
        args.repeats = min(args.repeats, 3)
    else:
        pairs = harness.parse_configs(args.configs)
    configs = sorted(((t, d, dtype) for t, d in pairs), key=lambda c: c[0] * c[1])
    if args.large:
        configs.append((*paper.LARGE, torch.float16))
    scheme = parse(args.format)
    device = _device(args.device)
    labels, skipped = _labels(args.backends, scheme, device)
    if args.no_cpu_baselines and device.type == "cuda":
        labels = [lb for lb in labels if lb not in _CPU_LABELS]
        skipped.append({"backend": "CPU baselines", "reason": "not measured (--no-cpu-baselines)"})
    return Settings(
        configs=configs,
        dist=harness.parse_distribution(args.dist),
        scheme=scheme,
        seed=args.seed,
        repeats=args.repeats,
        row_budget=args.row_budget,
        budget=(_CPU_BUDGET if device.type == "cpu" else 0.0) if args.budget is None else args.budget,
        device=device,
        labels=labels,
        skipped=skipped,
    )


# --------------------------------------------------------------------------------------------- runners


def _runner(label: str, scheme: Scheme, device: torch.device, channels: int, dtype: torch.dtype) -> Runner:
    dev = _row_device(label, device)
    if label == "torch-compile":
        # A fresh compilation per configuration (shapes are static); the reset keeps dynamo's
        # per-function recompilation limit from silently falling back to eager.
        torch.compiler.reset()

        def scales(x: torch.Tensor) -> Any:
            return reference.compute_scales(x, scheme)

        def quantize(x: torch.Tensor) -> tuple:
            return reference.quantize(x, scheme)

        def dequantize(c: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            return reference.dequantize(c, s, z, scheme, channels, dtype)

        return Runner(
            label,
            dev,
            torch.compile(scales, dynamic=False),
            torch.compile(quantize, dynamic=False),
            torch.compile(dequantize, dynamic=False),
        )
    if label == "cpu-scalar-columns":
        base = implementation(Backend.CPU_SCALAR)

        def quantize_columns(x: torch.Tensor) -> tuple:
            codes, scale = base.quantize_column_major(x[0])
            return codes.unsqueeze(0), scale.unsqueeze(0), None

        def dequantize_columns(c: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
            return base.dequantize_column_major(c[0], s[0]).unsqueeze(0).to(dtype)

        return Runner(label, dev, None, quantize_columns, dequantize_columns)
    impl = implementation(Backend.TORCH if label == "torch-eager" else Backend(label))
    return Runner(
        label,
        dev,
        lambda x: impl.compute_scales(x, scheme),
        lambda x: impl.quantize(x, scheme),
        lambda c, s, z: impl.dequantize(c, s, z, scheme, channels, dtype),
        reference=label in ("torch", "torch-eager") and dev == device,
    )


# --------------------------------------------------------------------------------------------- measuring


def _meta_bytes(scheme: Scheme, tokens: int, channels: int) -> tuple[int, int]:
    """(code bytes, scale + zero-point bytes) of one ``[tokens, channels]`` tensor."""
    ct, cd = scheme.code_shape(tokens, channels)
    return ct * cd, scheme.nbytes((tokens, channels)) - ct * cd


def _memory_needed(elements: int, itemsize: int) -> int:
    """Peak bytes of the reference at this size: the input, its float32 temporaries (the expanded
    scales and two intermediates, plus a float32 copy for half-precision input) and the codes."""
    return elements * (itemsize + 13 + (4 if itemsize != 4 else 0))


def _copies(t: torch.Tensor | None, n: int) -> list[torch.Tensor | None]:
    return [t] + [None if t is None else t.clone() for _ in range(n - 1)]


def _warm(r: Runner, x: torch.Tensor, channels: int) -> float:
    """Run each operation (compiles, autotunes, JITs); return the seconds of one more round on ``x``,
    a per-size estimate. On the CPU ``x`` is a small slice so that warming up costs little."""
    for _ in range(2):
        harness.synchronize(r.device)
        start = time.perf_counter()
        if r.scales is not None:
            r.scales(x)
        codes, scale, zero = r.quantize(x)
        r.dequantize(codes, scale, zero)
        harness.synchronize(r.device)
        seconds = time.perf_counter() - start
    return seconds


class _Bench:
    """One benchmark run: the settings, the per-backend cost estimates, the rows."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.rows: list[Row] = []
        # label -> (seconds per element of one repetition, elements, configuration) where last measured
        self.seconds_per_element: dict[str, tuple[float, int, str]] = {}
        self.start = time.perf_counter()
        self.fixed: list[tuple[int, float]] = []  # (elements, seconds) of each configuration's fixed work
        self.remaining: list[int] = []  # elements of the configurations after the current one
        self.phases: list[dict[str, Any]] = []  # where each configuration's time went

    def _room(self) -> float:
        """Seconds left for a row other than the reference: the run budget minus the time used and what
        the configurations still to come are predicted to need: their fixed work (input, copy,
        reference, metrics) and one repetition of each other row that fits the row budget there. The
        larger configurations, the paper's headline, thus come first when time is short."""
        if not self.s.budget:
            return math.inf
        reference = self.s.labels[0]
        reserve = 0.0
        for n in self.remaining:
            reserve += self._fixed_cost(n)
            for label in self.seconds_per_element:
                one = self._predict(label, n)[0]
                if label != reference and one <= self.s.row_budget:
                    reserve += one
        return self.s.budget - (time.perf_counter() - self.start) - reserve

    def _fixed_cost(self, n: int) -> float:
        """Predicted fixed work of a configuration of ``n`` elements: a line (a per-configuration
        overhead plus a cost per element) through the last two configurations of at least 2^22
        elements; 0 until there are two (the smaller configurations cost little)."""
        points = [p for p in self.fixed if p[0] >= _FIT_MIN_ELEMENTS][-2:]
        if len(points) < 2:
            return 0.0
        (n1, t1), (n2, t2) = points
        slope = (t2 - t1) / (n2 - n1) if n2 > n1 and t2 > t1 else t2 / n2
        return max(t2 + slope * (n - n2), 0.0)

    def _row(
        self, tokens: int, channels: int, dtype: torch.dtype, label: str, device: torch.device, **kw: Any
    ) -> Row:
        return Row(
            config=f"{tokens}x{channels}",
            tokens=tokens,
            channels=channels,
            elements=tokens * channels,
            dtype=harness.dtype_name(dtype),
            dist=self.s.dist,
            format=self.s.scheme.name,
            backend=label,
            device=str(device),
            **kw,
        )

    def _copy(self, x: torch.Tensor, device: torch.device, tokens: int, channels: int) -> Row:
        nbytes = 2 * x.numel() * x.element_size()
        dst = torch.empty_like(x)
        inputs = [(a,) for a in _copies(x, harness.rotation(nbytes, device))]
        harness.synchronize(device)
        start = time.perf_counter()
        dst.copy_(x)
        harness.synchronize(device)
        one = time.perf_counter() - start
        repeats = max(1, min(self.s.repeats, int(self.s.row_budget // max(one, 1e-9))))
        samples, _ = harness.time_calls(dst.copy_, inputs, repeats, device)
        seconds = harness.median(samples)
        return self._row(
            tokens,
            channels,
            x.dtype,
            "copy",
            device,
            repeats=repeats,
            copy_ms=seconds * 1e3,
            copy_bytes=nbytes,
            copy_gbps=nbytes / seconds / 1e9,
        )

    def _predict(self, label: str, n: int) -> tuple[float, str]:
        """Seconds of one repetition of ``label`` on ``n`` elements, from its last measurement, and
        where that came from. Counted double past 16x the measured size: memory walks get slower per
        element as they outgrow the caches (the column walk most of all)."""
        per, measured, where = self.seconds_per_element[label]
        far = n > 16 * measured
        return per * n * (2 if far else 1), f"its measured time at {where}" + (", doubled" if far else "")

    def _plan(self, r: Runner, x: torch.Tensor, channels: int) -> tuple[int, str | None]:
        """(repeats, skip reason) for a runner at this size, from what it cost before."""
        n = x.numel()
        if r.device.type == "cuda":
            one = _warm(r, x, channels)
            source = "a warm-up round at this size"
        elif r.label in self.seconds_per_element:
            one, source = self._predict(r.label, n)
        else:
            rows = min(x.shape[1], max(1, _WARMUP_ELEMENTS // channels))
            small = x[:, :rows].contiguous()
            one = _warm(r, small, channels) * n / small.numel()
            source = f"a warm-up round on {rows}x{channels}"
        budget = self.s.row_budget
        if r.reference:
            return max(1, min(self.s.repeats, int(budget // max(one, 1e-9)))), None
        room = self._room()
        if one > budget:
            return 0, (
                f"one repetition predicted to take {one:.3g} s, over the --row-budget of {budget:g} s "
                f"(extrapolated from {source})"
            )
        # a row of under 1% of the run budget costs too little to plan around: it always runs
        if one > room and one > _CHEAP * self.s.budget:
            return 0, (
                f"one repetition predicted to take {one:.3g} s (extrapolated from {source}); the run's "
                f"--budget of {self.s.budget:g} s has {max(room, 0.0):.3g} s left after keeping the "
                "reference's share of the configurations still to come"
            )
        # repeats spend at most half the room: predictions err, and the larger sizes come later
        return max(1, min(self.s.repeats, int(min(budget, max(room, 0.0) / 2) // max(one, 1e-9)))), None

    def _time(
        self, r: Runner, x: torch.Tensor, repeats: int, channels: int
    ) -> tuple[dict[str, Any], _Output]:
        scheme, tokens = self.s.scheme, x.shape[1]
        device, n = r.device, x.numel()
        x_bytes = n * x.element_size()
        code_bytes, meta_bytes = _meta_bytes(scheme, tokens, channels)
        q_bytes = x_bytes + code_bytes + meta_bytes
        d_bytes = code_bytes + meta_bytes + x_bytes
        xs = [(a,) for a in _copies(x, harness.rotation(q_bytes, device))]
        scales_s = harness.time_calls(r.scales, xs, repeats, device)[0] if r.scales else None
        quant_s, (codes, scale, zero) = harness.time_calls(r.quantize, xs, repeats, device)
        del xs
        n_dq = harness.rotation(d_bytes, device)
        dq_in = list(zip(_copies(codes, n_dq), _copies(scale, n_dq), _copies(zero, n_dq), strict=True))
        deq_s, x_hat = harness.time_calls(r.dequantize, dq_in, repeats, device)
        del dq_in
        t_q, t_d = harness.median(quant_s), harness.median(deq_s)
        timing = {
            "repeats": repeats,
            "quantize_ms": t_q * 1e3,
            "dequantize_ms": t_d * 1e3,
            "total_ms": (t_q + t_d) * 1e3,
            "quantize_bytes": q_bytes,
            "dequantize_bytes": d_bytes,
            "quantize_gbps": q_bytes / t_q / 1e9,
            "dequantize_gbps": d_bytes / t_d / 1e9,
        }
        t_s = 0.0
        if scales_s is not None:
            t_s = harness.median(scales_s)
            s_bytes = x_bytes + meta_bytes
            timing.update(scales_ms=t_s * 1e3, scales_bytes=s_bytes, scales_gbps=s_bytes / t_s / 1e9)
        self.seconds_per_element[r.label] = ((t_s + t_q + t_d) / n, n, f"{tokens}x{channels}")
        return timing, _Output(codes, scale, zero, x_hat)

    def _errors(self, x: torch.Tensor, out: _Output, queries: torch.Tensor) -> dict[str, Any]:
        scheme = self.s.scheme
        q = queries.to(x.device)
        rep = metrics.report(x, out.x_hat, q)
        result: dict[str, Any] = {
            "max_abs_error": rep["max_abs_error"],
            "l2_error": rep["l2_error"],
            "relative_l2_error": rep["relative_l2_error"],
            "sqnr_db": rep["sqnr_db"],
            "attention_error": rep["attention_score_error"],
            "attention_error_1q": rep["attention_score_error_first"],
        }
        if scheme.fp8 is None:
            top = float(out.scale.float().max())
            result["bound"] = top / 2
            if scheme.symmetric:
                # scale/2 in exact arithmetic; float32 rounding of x / scale and of q * scale adds at
                # most a few units in the last place of the largest |x| (= 127 * scale), and returning
                # x_hat in a half-precision input dtype adds half a unit in its last place there.
                largest = top * scheme.qmax
                slack = 2.0**-21 * largest + torch.finfo(out.x_hat.dtype).eps / 2 * largest
                result["within_bound"] = rep["max_abs_error"] <= top / 2 + slack
        return result

    def config(self, tokens: int, channels: int, dtype: torch.dtype, progress: Any) -> None:
        """Measure every row of one configuration (the reference first)."""
        s = self.s
        n = tokens * channels
        start = time.perf_counter()

        def add(label: str, device: torch.device, **kw: Any) -> None:
            self.rows.append(self._row(tokens, channels, dtype, label, device, **kw))

        devices = {_row_device(label, s.device) for label in s.labels}
        need = _memory_needed(n, dtype.itemsize)
        too_big = {}
        for device in devices:
            if device.type == "cuda":
                torch.cuda.empty_cache()
            free = harness.available_memory(device)
            if need > free:
                too_big[device] = (
                    f"too large for memory on {device}: the reference needs about {need / 1e9:.1f} GB, "
                    f"{free / 1e9:.1f} GB free"
                )
        if s.device in too_big:
            for label in s.labels:
                add(label, _row_device(label, s.device), status="skipped", reason=too_big[s.device])
                progress.update(1)
            return
        x_cpu = harness.synthetic((1, tokens, channels), s.dist, dtype, s.seed)
        phase = {"config": f"{tokens}x{channels}", "dtype": harness.dtype_name(dtype)}
        phase["input_s"] = time.perf_counter() - start
        metrics_s = 0.0
        queries = harness.synthetic((_QUERIES, channels), "uniform", torch.float32, s.seed + 1)
        inputs = {torch.device("cpu"): x_cpu}
        if s.device.type == "cuda":
            inputs[s.device] = x_cpu.to(s.device)
            if torch.device("cpu") not in devices:
                del inputs[torch.device("cpu")]
            del x_cpu
        for device, x in inputs.items():
            self.rows.append(self._copy(x, device, tokens, channels))
        ref: _Output | None = None
        ref_errors: dict[str, Any] = {}
        moved: dict[tuple[str, torch.device], torch.Tensor | None] = {}

        def ref_on(name: str, device: torch.device) -> torch.Tensor | None:
            if (name, device) not in moved:
                t = getattr(ref, name)
                moved[(name, device)] = None if t is None else t.to(device)
            return moved[(name, device)]

        for label in s.labels:
            device = _row_device(label, s.device)
            progress.set_postfix_str(f"{tokens}x{channels} {label}")
            if device in too_big:
                add(label, device, status="skipped", reason=too_big[device])
                progress.update(1)
                continue
            x = inputs[device]
            try:
                r = _runner(label, s.scheme, s.device, channels, dtype)
                repeats, reason = self._plan(r, x, channels)
                if reason:
                    add(label, device, status="skipped", reason=reason)
                    continue
                timing, out = self._time(r, x, repeats, channels)
                if r.reference:
                    ref, exact = out, True
                    tick = time.perf_counter()
                    ref_errors = self._errors(x, out, queries)
                    metrics_s += time.perf_counter() - tick
                    errors, source = ref_errors, "own output"
                    self.fixed.append((n, time.perf_counter() - start))
                elif ref is None:
                    exact, errors, source = None, self._errors(x, out, queries), "own output"
                else:
                    exact = (
                        torch.equal(out.codes, ref_on("codes", device))
                        and torch.equal(out.scale, ref_on("scale", device))
                        and (out.zero is None or torch.equal(out.zero, ref_on("zero", device)))
                    )
                    if exact and torch.equal(out.x_hat, ref_on("x_hat", device)):
                        errors, source = ref_errors, "identical to the reference"
                    else:
                        errors, source = self._errors(x, out, queries), "own output"
                    del out
                add(label, device, exact=exact, metrics_from=source, **timing, **errors)
            except Exception as err:  # one backend failing must not stop the study; the row says why
                add(label, device, status="error", reason=f"{type(err).__name__}: {err}")
            finally:
                progress.update(1)
        self._derive(f"{tokens}x{channels}", harness.dtype_name(dtype))
        phase.update(reference_metrics_s=metrics_s, total_s=time.perf_counter() - start)
        self.phases.append({k: round(v, 2) if isinstance(v, float) else v for k, v in phase.items()})

    def _derive(self, config: str, dtype: str) -> None:
        """Speedups over the CPU baselines and fractions of the copy bandwidth, within one configuration."""
        rows = [r for r in self.rows if r.config == config and r.dtype == dtype and r.status == "ok"]
        cpu = "cpu"
        scalar = next((r.total_ms for r in rows if r.backend == "cpu-scalar"), None)
        columns = next((r.total_ms for r in rows if r.backend == "cpu-scalar-columns"), None)
        torch_cpu = next((r.total_ms for r in rows if r.backend == "torch" and r.device == cpu), None)
        copy = {r.device: r.copy_gbps for r in rows if r.backend == "copy"}
        for r in rows:
            if r.total_ms is None:
                continue
            if scalar:
                r.speedup_vs_scalar = scalar / r.total_ms
            if torch_cpu:
                r.speedup_vs_torch_cpu = torch_cpu / r.total_ms
            if columns:
                r.speedup_vs_columns = columns / r.total_ms
            ceiling = copy.get(r.device)
            if ceiling:
                r.scales_of_copy = r.scales_gbps and r.scales_gbps / ceiling
                r.quantize_of_copy = r.quantize_gbps / ceiling
                r.dequantize_of_copy = r.dequantize_gbps / ceiling


# --------------------------------------------------------------------------------------------- output

_TIME_COLUMNS = [
    "config",
    "backend",
    "device",
    "repeats",
    "scales_ms",
    "quantize_ms",
    "dequantize_ms",
    "quantize_gbps",
    "dequantize_gbps",
    "quantize_of_copy",
    "dequantize_of_copy",
    "speedup_vs_scalar",
    "speedup_vs_torch_cpu",
    "exact",
]
_TIME_HEADERS = [
    "config",
    "backend",
    "device",
    "reps",
    "scales ms",
    "quant ms",
    "dequant ms",
    "quant GB/s",
    "deq GB/s",
    "quant/copy",
    "deq/copy",
    "x scalar",
    "x torch-cpu",
    "exact",
]
ERROR_COLUMNS = [
    "config",
    "backend",
    "max_abs_error",
    "bound",
    "within_bound",
    "l2_error",
    "relative_l2_error",
    "sqnr_db",
    "attention_error",
    "attention_error_1q",
]
_ERROR_HEADERS = [
    "config",
    "from",
    "max abs",
    "scale/2",
    "<= bound",
    "L2 (f64)",
    "rel L2",
    "SQNR dB",
    f"attn err ({_QUERIES} q)",
    "attn err (1 q)",
]


def error_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The error figures of each configuration: the reference's, plus any backend whose output differs."""
    return [
        r
        for r in rows
        if r["status"] == "ok" and r["backend"] != "copy" and r["metrics_from"] == "own output"
    ]


def print_tables(results: dict[str, Any]) -> None:
    rows = results["rows"]
    timed = [r for r in rows if r["status"] == "ok" and r["backend"] != "copy"]
    print(harness.text_table(timed, _TIME_COLUMNS, _TIME_HEADERS))
    print()
    copies = [r for r in rows if r["status"] == "ok" and r["backend"] == "copy"]
    print(
        harness.text_table(
            copies, ["config", "device", "copy_ms", "copy_gbps"], ["copy of x", "device", "ms", "GB/s"]
        )
    )
    print()
    print(harness.text_table(error_rows(rows), ERROR_COLUMNS, _ERROR_HEADERS))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['status']}: {r['config']} {r['backend']} ({r['device']}): {r['reason']}")
    for s in results["skipped_backends"]:
        print(f"not measured: {s['backend']}: {s['reason']}")


def _measure(settings: Settings) -> dict[str, Any]:
    """Run the study; the results as saved in ``results.json``."""
    from tqdm.auto import tqdm

    bench = _Bench(settings)
    env = harness.environment(settings.device)
    start = time.perf_counter()
    total = len(settings.configs) * len(settings.labels)
    # events and kernels on the benchmark's GPU, whichever is current
    scope = torch.cuda.device(settings.device) if settings.device.type == "cuda" else contextlib.nullcontext()
    with (
        scope,
        tqdm(total=total, desc="kvpack bench", unit="row", file=sys.stderr, mininterval=1.0) as progress,
    ):
        for i, (tokens, channels, dtype) in enumerate(settings.configs):
            bench.remaining = [t * d for t, d, _ in settings.configs[i + 1 :]]
            bench.config(tokens, channels, dtype, progress)
    env["seconds"] = round(time.perf_counter() - start, 1)
    return {
        "kind": "kvpack-bench",
        "environment": env,
        "settings": {
            "configs": [f"{t}x{d}:{harness.dtype_name(dt)}" for t, d, dt in settings.configs],
            "dist": settings.dist,
            "format": settings.scheme.name,
            "seed": settings.seed,
            "repeats": settings.repeats,
            "row_budget_s": settings.row_budget,
            "budget_s": settings.budget or None,
            "queries": _QUERIES,
            "backends": settings.labels,
        },
        "skipped_backends": settings.skipped,
        "rows": [asdict(r) for r in bench.rows],
        "phases": bench.phases,
    }


def _load(path: str) -> dict[str, Any]:
    try:
        results = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read saved results from {path}: {err}") from None
    if not isinstance(results, dict) or results.get("kind") != "kvpack-bench":
        raise ValueError(f"{path} is not a kvpack bench results.json")
    return results


def run(args: argparse.Namespace) -> int:
    """``kvpack bench``: measure (or load ``--from`` saved results), write the files, print the tables."""
    from kvpack.bench import report

    if args.from_results:
        results = _load(args.from_results)
        out = Path(args.out if args.out != _DEFAULT_OUT else Path(args.from_results).parent)
    else:
        results = _measure(_settings(args))
        out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.from_results:
        harness.write_json(out / "results.json", results)
        harness.write_csv(out / "results.csv", results["rows"])
    notes = []
    if not args.no_plots:
        from kvpack.bench import plots

        notes = plots.bench_plots(results, out)
    (out / "report.md").write_text(report.bench_report(results, notes))
    if args.json:
        print(harness.json_text(results))
    else:
        print_tables(results)
        for note in notes:
            if not note.endswith(".png"):
                print(note)
        made = "report.md" if args.from_results else "results.json, results.csv, report.md"
        print(
            f"\nwrote {made} and the plots to {out}/ ({results['environment'].get('seconds')} s of measuring)"
        )
    return 1 if any(r["status"] == "error" for r in results["rows"]) else 0


def roundtrip_gbps(row: dict[str, Any]) -> float | None:
    """Quantize + dequantize bytes over quantize + dequantize time, GB/s (the paper's combined rate)."""
    if row.get("total_ms") is None:
        return None
    return (row["quantize_bytes"] + row["dequantize_bytes"]) / (row["total_ms"] / 1e3) / 1e9


def best(rows: list[dict[str, Any]], config: str, labels: tuple[str, ...]) -> dict[str, Any] | None:
    """The fastest (quantize + dequantize) ok row of ``config`` among ``labels``."""
    cands = [r for r in rows if r["config"] == config and r["backend"] in labels and r["status"] == "ok"]
    return min(cands, key=lambda r: r["total_ms"], default=None)
