"""Check and time kvpack's decode attention (kvpack.attention.decode, the Triton flash-decoding kernel).

1. Correctness: runs tests/test_attention.py and tests/test_hf_attention.py on the GPU and prints a
   PASS/FAIL/SKIP table. At GPU sizes: every cache preset (int8, int4, fp8, int2) at head dims 64, 96,
   128 and 256 in float16 and bfloat16, 32 query heads over 8 KV heads (and 8 or 64 query heads, 1 or
   4 query tokens); long padded batches (32868 tokens, left and right padding, 1 and 3 queries); forced
   split counts and tile sizes; CUDA-graph replay and torch.compile. At small sizes: every key/value
   format pair, odd shapes, a store still empty (window only), the transformers attention; and every
   kernel variant those tests and the benchmarks launch, compiled for sm_90. Every case compares with
   float32 attention over the layer's dequantized cache (kvpack.reference.attention): relative L2 error
   below 1e-2.
2. Tile sweep: int8 and int4 at batch 8, 32 query / 8 KV heads, 32768 tokens, for tokens per tile,
   warps, pipeline stages and split counts, next to the default choice.
3. The kernel table of ``kvpack bench-attention`` in a short form (batches 1 and 8, 16K and 32K tokens,
   8 and 32 KV heads, every preset, SDPA float16 and dequantize-then-SDPA beside them).

Each stage runs in a child process, and the tests in pytest-xdist workers (when pytest-xdist is
installed; else a test file that crashes its process is run again without the tests already reported),
so that a crash (a compiler abort, an illegal memory access) costs only the test or the stage it hit.

Usage (from the repository root)::

    python benchmarks/gpu_check_attention.py [--no-tests] [--no-sweep] [--no-bench] [--repeats 10]
        [--workers 8]

Writes ``gpu_check_attention.json`` into ``$OUT`` when that variable is set (else the current folder).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))

import torch  # noqa: E402

from kvpack.bench import harness  # noqa: E402

DEVICE = torch.device("cuda")
TESTS = ("tests/test_attention.py", "tests/test_hf_attention.py")
COMPILE_TEST = "tests/test_attention.py::test_every_gpu_kernel_variant_compiles_for_h100"
COMPILE_SHARDS = 4
#: Seconds one test file, or one benchmark stage, may run.
STAGE_TIMEOUT = 600

# ------------------------------------------------------------------------------------------ correctness

# Runs pytest, writing one JSON line per test as soon as it is known: a test starting, then its
# outcome (a process that dies leaves the started test without one).
_PYTEST_CHILD = """
import json, sys
import pytest

class Rows:
    def __init__(self, path):
        self.out = open(path, "a", buffering=1)

    def pytest_runtest_logstart(self, nodeid, location):
        self.out.write(json.dumps({"start": nodeid}) + "\\n")

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            row = {"nodeid": report.nodeid, "stage": report.when, "outcome": report.outcome,
                   "seconds": round(report.duration, 2)}
            if report.outcome != "passed":
                row["detail"] = str(report.longrepr)[-1500:]
            self.out.write(json.dumps(row) + "\\n")

sys.exit(pytest.main(sys.argv[2:], plugins=[Rows(sys.argv[1])]))
"""


def _row(nodeid: str, status: str, seconds: float, detail: str | None = None, stage: str = "call") -> dict:
    file, _, case = nodeid.partition("::")
    row = {"case": case, "file": file, "stage": stage, "status": status, "seconds": seconds}
    if detail:
        row["detail"] = detail
    print(f"{status:5} {seconds:7.2f} s  {case}", flush=True)
    return row


def run_tests(paths: list[str], workers: int, skip: tuple[str, ...] = ()) -> list[dict]:
    """The tests of ``paths`` but ``skip`` (node ids), in a child pytest (in ``workers`` xdist workers if
    there are any). If the child dies, the test it was running is a CRASH and the rest run again."""
    rows: list[dict] = []
    done: set[str] = set()
    for _ in range(5):
        with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as log:
            args = [*paths, "-q", "-p", "no:cacheprovider", "--no-header", "-rN"]
            args += ["-n", str(workers)] if workers else []
            args += [a for nodeid in (*skip, *sorted(done)) for a in ("--deselect", nodeid)]
            code, tail = _run([sys.executable, "-c", _PYTEST_CHILD, log.name, *args], capture=True)
            started = []
            for line in log.read().splitlines():
                event = json.loads(line)
                if "start" in event:
                    started.append(event["start"])
                    continue
                status = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}[event["outcome"]]
                detail = event.get("detail")
                if detail and "crashed while running" in detail:  # an xdist worker died in this test
                    status, detail = "CRASH", f"{detail}\n{tail}"
                rows.append(_row(event["nodeid"], status, event["seconds"], detail, event["stage"]))
                done.add(event["nodeid"])
        if code in (0, 1, 5):  # all passed, some failed, none collected: pytest finished
            return rows
        unfinished = [nodeid for nodeid in started if nodeid not in done]
        if code is None:
            for nodeid in unfinished or ["(the tests)"]:
                rows.append(_row(nodeid, "TIMEOUT", STAGE_TIMEOUT, f"still running after {STAGE_TIMEOUT} s"))
            return rows
        why = f"the test process ended with exit status {code}:\n{tail}"
        for nodeid in unfinished or ["(the tests)"]:
            rows.append(_row(nodeid, "CRASH", 0.0, why))
            done.add(nodeid)
        if not unfinished:
            return rows
    return rows


def _run(cmd: list[str], capture: bool = False) -> tuple[int | None, str]:
    """Run ``cmd`` from the repository root in a process group of its own, killed whole (pytest-xdist
    workers included) after :data:`STAGE_TIMEOUT` seconds. Returns the exit status (None on a time-out)
    and, if ``capture``, the last 3000 characters of its output (else its output is shown)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE if capture else None,
                            stderr=subprocess.STDOUT if capture else None, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=STAGE_TIMEOUT)
        return proc.returncode, (out or "")[-3000:]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, (out or "")[-3000:]


def check_correctness(workers: int) -> list[dict]:
    """Every test of the two test files, on the GPU (see the module doc). The test that compiles every
    kernel variant for sm_90 needs no GPU: it runs beside the others from the start, in processes of
    its own, rather than last in one pytest worker."""
    if workers and importlib.util.find_spec("xdist") is None:
        print("pytest-xdist is not installed: the tests run one after another", flush=True)
        workers = 0
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": tmp}
        logs = [Path(tmp, f"compile-{i}.log") for i in range(COMPILE_SHARDS)]
        shards = []
        for i, log in enumerate(logs):
            with log.open("w") as out:
                shards.append(subprocess.Popen([sys.executable, TESTS[0], f"{i}/{COMPILE_SHARDS}"], cwd=ROOT,
                                               env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))
        started = time.perf_counter()
        rows = run_tests(list(TESTS), workers, skip=(COMPILE_TEST,))
        outputs = []
        for shard, log in zip(shards, logs, strict=True):
            try:
                shard.wait(timeout=max(1.0, STAGE_TIMEOUT - (time.perf_counter() - started)))
                outputs.append((log.read_text(), shard.returncode))
            except subprocess.TimeoutExpired:
                os.killpg(shard.pid, signal.SIGKILL)
                shard.wait()
                outputs.append((log.read_text() + f"\ntimed out after {STAGE_TIMEOUT} s", None))
    failed = [(out, code) for out, code in outputs if code != 0]
    detail = "\n".join(out[-3000:] for out, _ in failed) or None
    status = "PASS" if not failed else "CRASH" if any(code and code < 0 for _, code in failed) else "FAIL"
    rows.append(_row(COMPILE_TEST, status, round(time.perf_counter() - started, 2), detail))
    return rows


# ------------------------------------------------------------------------------------------------ sweep


def _queries(layer: Any, q_heads: int) -> torch.Tensor:
    b, _, _, d = layer.window_keys.shape
    g = torch.Generator(device=DEVICE).manual_seed(1)
    return torch.randn(b, q_heads, 1, d, generator=g, device=DEVICE).to(layer.dtype)


def _sweep_preset(preset: str, repeats: int) -> list[dict]:
    from kvpack.attention import decode
    from kvpack.bench import attention as bench
    from kvpack.triton.attention import default_config

    layer = bench.filled_layer(preset, 8, 8, 32768, 128, DEVICE)
    nbytes = bench.layer_bytes(layer)
    q = _queries(layer, 32)
    rows = []
    group_rows = q.shape[1] // layer.window_keys.shape[1]
    base = default_config(128, layer.group, layer.key_scheme, layer.value_scheme, group_rows)
    for i, config in enumerate(bench.sweep_configs(base)):
        row = {"preset": preset, "default": i == 0, **dataclasses.asdict(config)}
        try:
            decode(q, layer, config=config)
            torch.cuda.synchronize()
            samples, _ = harness.time_calls(lambda c=config: decode(q, layer, config=c), [()], repeats,
                                            DEVICE)
            row["ms"] = harness.median(samples) * 1e3
            row["gbps"] = nbytes / row["ms"] / 1e6
        except Exception as exc:  # a configuration that does not compile or fit is reported
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def sweep(repeats: int) -> dict[str, Any]:
    """Time the kernel over tile shapes, warps, stages and split counts (int8 and int4, batch 8,
    32 q / 8 KV heads, 32768 tokens, head dim 128)."""
    from kvpack.bench import attention as bench

    rows = []
    for preset in bench.SWEEP_PRESETS:
        rows += _sweep_preset(preset, repeats)
        torch.cuda.empty_cache()
    print(harness.text_table(rows, ["preset", "default", "block_m", "block_n", "num_warps", "num_stages",
                                    "num_splits", "value_fields", "ms", "gbps", "error"]))
    for preset in bench.SWEEP_PRESETS:
        ok = [r for r in rows if r["preset"] == preset and "ms" in r]
        if ok:
            best, default = min(ok, key=lambda r: r["ms"]), next((r for r in ok if r["default"]), None)
            print(f"{preset}: best {best['ms']:.4f} ms ({best['gbps']:.0f} GB/s) with "
                  f"block_m={best['block_m']} block_n={best['block_n']} warps={best['num_warps']} "
                  f"stages={best['num_stages']} "
                  f"splits={best['num_splits']} value_fields={best['value_fields']}; "
                  f"default {default and round(default['ms'], 4)} ms")
    return {"sweep": rows}


# ------------------------------------------------------------------------------------------------ bench


def kernel_table(repeats: int) -> dict[str, Any]:
    """The kernel table of ``kvpack bench-attention`` in a short form."""
    from kvpack.bench import attention as bench

    ns = argparse.Namespace(batches=[1, 8], contexts=[16384, 32768], kv_heads=[8, 32], q_heads=32,
                            head_dim=128, formats=list(bench.FORMATS), repeats=repeats, seed=0)

    class Progress:
        def set_postfix_str(self, text: str) -> None:
            print(f"  {text}", flush=True)

        def update(self, n: int) -> None:
            pass

    kb = bench.KernelBench(ns, DEVICE)
    kb.run(Progress())
    rows = [dataclasses.asdict(r) for r in kb.rows]
    bench.print_tables({"copy_gbps": kb.copy_gbps, "rows": rows})
    return {"copy_gbps": kb.copy_gbps, "bench": rows}


STAGES = {"sweep": sweep, "bench": kernel_table}


def run_stage(name: str, repeats: int) -> dict[str, Any]:
    """One benchmark stage in a child process (its output shown as it comes); its results, or why there
    are none."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as part:
        code, _ = _run([sys.executable, __file__, "--stage", name, "--part", part.name, "--repeats",
                        str(repeats)])
        text = part.read()
    if code == 0 and text:
        return json.loads(text)
    why = "a time-out" if code is None else f"exit status {code}"
    return {f"{name}_error": f"the {name} stage ended with {why}"}


# ------------------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-tests", action="store_true", help="skip the correctness tests")
    parser.add_argument("--no-sweep", action="store_true", help="skip the tile sweep")
    parser.add_argument("--no-bench", action="store_true", help="skip the kernel table")
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions, median kept (default 10)")
    parser.add_argument("--workers", type=int, default=8,
                        help="pytest-xdist workers for the tests (default 8; 0: one process per file)")
    parser.add_argument("--stage", choices=list(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: this check needs one", file=sys.stderr)
        return 2
    if args.stage:
        Path(args.part).write_text(harness.json_text(STAGES[args.stage](args.repeats)))
        return 0

    t0 = time.perf_counter()
    result: dict = {"kind": "kvpack-gpu-check-attention", "environment": harness.environment(DEVICE)}
    result["correctness"] = []
    if not args.no_tests:
        print("== correctness: the attention tests on the GPU", flush=True)
        result["correctness"] = check_correctness(args.workers)
    bad = [r for r in result["correctness"] if r["status"] in ("FAIL", "CRASH", "TIMEOUT")]
    statuses = ("PASS", "FAIL", "CRASH", "TIMEOUT", "SKIP")
    counts = {s: sum(r["status"] == s for r in result["correctness"]) for s in statuses}
    result["correctness_seconds"] = round(time.perf_counter() - t0, 1)
    print(", ".join(f"{n} {s}" for s, n in counts.items()) + f" ({result['correctness_seconds']:.0f} s)")
    for r in bad:
        print(f"\n{r['status']} {r['case']} ({r['stage']}):\n{r.get('detail', '')}")
    print(flush=True)

    titles = {"sweep": "tile sweep", "bench": "kernel table (kvpack bench-attention, short form)"}
    for name, skip in (("sweep", args.no_sweep), ("bench", args.no_bench)):
        if not skip:
            print(f"== {titles[name]}", flush=True)
            started = time.perf_counter()
            result.update(run_stage(name, args.repeats))
            result[f"{name}_seconds"] = round(time.perf_counter() - started, 1)
            print(flush=True)

    result["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    harness.write_json(out / "gpu_check_attention.json", result)
    print(f"\nwrote {out / 'gpu_check_attention.json'} in {result['seconds']:.0f} s")
    return 1 if bad or any(k.endswith("_error") for k in result) else 0


if __name__ == "__main__":
    sys.exit(main())
