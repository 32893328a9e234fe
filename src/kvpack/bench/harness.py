"""What every kvpack benchmark needs: seeded inputs, timing, the environment, and output files.

Timing rules (the same for every benchmark):

- CPU: ``time.perf_counter`` around each call.
- CUDA: CUDA events around a batch of calls, after warm-up. Before each timed batch the GPU is held
  busy (``torch.cuda._sleep``) for as long as the host needs to queue the batch, so the events measure
  GPU time, not Python launch latency.
- On a GPU, inputs smaller than the L2 cache are rotated through enough copies that no call finds its
  input still cached by the call before (an input that fits in cache would report cache bandwidth).
- A time is the median of the repeats.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

#: Synthetic input distributions. ``keys``: Gaussian with a few outlier channels 20-100x larger (as
#: real keys have); ``values``: Gaussian with a few outlier tokens 20-100x larger. ``outliers`` is
#: another name for ``keys``.
DISTRIBUTIONS = ("uniform", "gaussian", "keys", "values")
_ALIASES = {"outliers": "keys"}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

_CHUNK = 1 << 22  # elements generated per seeded chunk (the chunks run on all CPU cores)
_MAX_ROTATION = 256  # most input copies rotated through for a small input


def parse_shape(text: str, dims: int | None = 2) -> tuple[int, ...]:
    """``"4096x128"`` -> ``(4096, 128)``. ``dims=None`` accepts two or more dimensions."""
    parts = text.lower().replace(" ", "").split("x")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape) or (dims and len(shape) != dims) or len(shape) < 2:
        want = "TOKENSxCHANNELS, e.g. 4096x128" if dims == 2 else "[BATCHx]TOKENSxCHANNELS, e.g. 4096x128"
        raise ValueError(f"bad shape {text!r}: expected {want} with positive integers")
    return shape


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"2048x128,131072x1024"`` -> ``[(2048, 128), (131072, 1024)]``."""
    configs = [parse_shape(part) for part in text.split(",") if part.strip()]
    if not configs:
        raise ValueError("no configurations given: expected e.g. --configs 2048x128,131072x1024")
    return [(tokens, channels) for tokens, channels in configs]


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of: {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parse_distribution(name: str) -> str:
    name = _ALIASES.get(name, name)
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"unknown distribution {name!r}; choose one of: {', '.join(DISTRIBUTIONS)}, outliers"
        )
    return name


def _chunk_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index * 7919 + 1) % (1 << 63)


def _fill(flat: torch.Tensor, dist: str, seed: int) -> None:
    """Fill ``flat`` chunk by chunk, each chunk with its own seeded generator, chunks in parallel.

    The result depends on the seed only (not on the number of threads).
    """

    def one(i: int) -> None:
        part = flat[i * _CHUNK : (i + 1) * _CHUNK]
        g = torch.Generator().manual_seed(_chunk_seed(seed, i))
        tmp = part if part.dtype == torch.float32 else torch.empty(part.shape, dtype=torch.float32)
        if dist == "uniform":
            tmp.uniform_(-1.0, 1.0, generator=g)
        else:
            tmp.normal_(generator=g)
        if tmp is not part:
            part.copy_(tmp)

    chunks = math.ceil(flat.numel() / _CHUNK)
    with ThreadPoolExecutor(max_workers=min(chunks, os.cpu_count() or 1)) as pool:
        list(pool.map(one, range(chunks)))


def synthetic(
    shape: Sequence[int], dist: str = "uniform", dtype: torch.dtype = torch.float32, seed: int = 0
) -> torch.Tensor:
    """A seeded CPU tensor of ``shape [..., tokens, channels]`` drawn from ``dist``.

    ``uniform``: U[-1, 1] (the paper's inputs); ``gaussian``: N(0, 1); ``keys``: N(0, 1) with
    max(1, channels / 32) outlier channels scaled by factors drawn from [20, 100]; ``values``: N(0, 1)
    with max(1, tokens / 64) outlier tokens scaled likewise.

    >>> synthetic((2048, 128), "keys", seed=0).shape
    torch.Size([2048, 128])
    """
    dist = parse_distribution(dist)
    if dtype not in DTYPES.values():
        raise TypeError(f"dtype {dtype} is not supported; accepted: {', '.join(DTYPES)}")
    x = torch.empty(tuple(shape), dtype=dtype)
    _fill(x.view(-1), "uniform" if dist == "uniform" else "normal", seed)
    if dist in ("keys", "values"):
        g = torch.Generator().manual_seed(_chunk_seed(seed, -1))
        axis = -1 if dist == "keys" else -2
        n = x.shape[axis]
        count = max(1, n // (32 if dist == "keys" else 64))
        idx = torch.randperm(n, generator=g)[:count]
        factor = torch.empty(count).uniform_(20.0, 100.0, generator=g).to(dtype)
        if dist == "keys":
            x[..., idx] *= factor
        else:
            x[..., idx, :] *= factor[:, None]
    return x


def median(samples: Sequence[float]) -> float:
    return statistics.median(samples)


def rotation(op_bytes: int, device: torch.device) -> int:
    """How many input copies to cycle through on a GPU so that a call never finds its input in L2: the
    other copies' traffic (``op_bytes`` each, inputs plus outputs) must be at least twice the cache.
    On the CPU inputs are not rotated (1)."""
    if device.type != "cuda" or op_bytes <= 0:
        return 1
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return max(1, min(_MAX_ROTATION, math.ceil(2 * l2 / op_bytes) + 1))


@functools.cache
def _gpu_cycles_per_second() -> float:
    """Clock rate seen by ``torch.cuda._sleep`` (measured once)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1000)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / (start.elapsed_time(end) / 1e3)


def _time_cuda(fn: Callable[..., Any], inputs: Sequence[tuple], repeats: int) -> tuple[list[float], Any]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    host = time.perf_counter()
    out = None
    for args in inputs:
        out = None
        out = fn(*args)
    host = time.perf_counter() - host
    torch.cuda.synchronize()
    sleep = hasattr(torch.cuda, "_sleep")
    cycles = int(min(1.5 * host, 0.5) * _gpu_cycles_per_second()) if sleep else 0
    samples = []
    for _ in range(repeats):
        if cycles:
            torch.cuda._sleep(cycles)
        start.record()
        for args in inputs:
            out = None
            out = fn(*args)
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(inputs))
    return samples, out


def time_calls(
    fn: Callable[..., Any], inputs: Sequence[tuple], repeats: int, device: torch.device
) -> tuple[list[float], Any]:
    """Time ``fn(*args)`` for each ``args`` in ``inputs`` (the rotation), ``repeats`` times.

    Returns (seconds per call for each repeat, the last call's result). Warm-up (compilation,
    autotuning) is the caller's job. Each result is dropped before the next call, so at most one
    lives at a time.
    """
    if repeats < 1 or not inputs:
        raise ValueError("time_calls needs at least one repeat and one input")
    if device.type == "cuda":
        return _time_cuda(fn, inputs, repeats)
    samples, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        for args in inputs:
            out = None
            out = fn(*args)
        samples.append((time.perf_counter() - start) / len(inputs))
    return samples, out


def capture_graph(fn: Callable[..., Any], inputs: Sequence[tuple]) -> tuple[Any, Any]:
    """``(graph, last result)``: the calls of ``fn`` over ``inputs`` warmed up on a side stream, then
    captured as one CUDA graph (a RuntimeError where ``fn`` cannot be captured)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for args in inputs:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the graph's own memory pool comes on top of what the warm-up cached
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = None
        for args in inputs:
            out = None
            out = fn(*args)
    return graph, out


def time_graph(fn: Callable[..., Any], inputs: Sequence[tuple], repeats: int) -> tuple[list[float], Any]:
    """Like :func:`time_calls` on a GPU, but the calls over the rotation are captured once as a CUDA graph
    (:func:`capture_graph`) and each repeat times one replay: no host work between the kernels, as a
    server replays its decoding step. Falls back to :func:`time_calls` (returning its result) when
    ``fn`` cannot be captured."""
    if repeats < 1 or not inputs:
        raise ValueError("time_graph needs at least one repeat and one input")
    try:
        graph, out = capture_graph(fn, inputs)
    except RuntimeError:
        torch.cuda.synchronize()
        return time_calls(fn, inputs, repeats, torch.device("cuda"))
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / len(inputs))
    out = out.clone() if isinstance(out, torch.Tensor) else out
    del graph
    return samples, out


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device`` (host memory for the CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    """stdout of ``git args`` run beside this file, or None where git or the repository is missing."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def _git_commit() -> str | None:
    out = _git("rev-parse", "HEAD")
    return None if out is None else out.strip() or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from ``git_commit`` (then it does not name the code that ran)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out.strip())


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # an optional package that is absent or broken has no version to report
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a benchmark ran: device, CPU, versions, date (UTC), git commit."""
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numba": _version("numba"),
        "kvpack": _version("kvpack"),
        "git_commit": _git_commit(),
        "git_dirty": _git_dirty(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
        env["l2_cache_bytes"] = getattr(props, "L2_cache_size", None)
    return env


def json_text(data: Any) -> str:
    """JSON for results: indented; non-finite floats (an exact SQNR is inf) as strings."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(w) for k, w in v.items()}
        if isinstance(v, list | tuple):
            return [clean(w) for w in v]
        return v

    return json.dumps(clean(data), indent=2, default=str)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json_text(data) + "\n")


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Rows as CSV; the columns are the union of the rows' keys, in first-seen order."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)


def fmt_value(value: Any, digits: int = 4) -> str:
    """A table cell: floats to ``digits`` significant digits, None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _cells(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[list[str]]:
    return [[fmt_value(row.get(c)) for c in columns] for row in rows]


def text_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    """A plain aligned table for the terminal."""
    head = list(headers or columns)
    body = _cells(rows, columns)
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def markdown_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None
) -> str:
    head = list(headers or columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _cells(rows, columns)]
    return "\n".join(lines)
