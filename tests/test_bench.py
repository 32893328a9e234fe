"""The benchmark harness and ``kvpack bench`` on tiny configurations: complete rows, exactness that can
fail, skips that are recorded, the report and the plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import requires_cuda, requires_numba
from kvpack import cli
from kvpack.bench import harness, paper, quant

_TIMED = ("quantize_ms", "dequantize_ms", "total_ms", "quantize_gbps", "dequantize_gbps", "quantize_of_copy")
_ERRORS = tuple(c for c in quant.ERROR_COLUMNS if c not in ("config", "backend"))


def _bench(tmp_path: Path, capsys: pytest.CaptureFixture, *args: str, code: int = 0) -> dict:
    """``kvpack bench --json`` with ``args``, on the CPU unless they name a device (the CPU tests must
    not pick up a GPU where there is one)."""
    out = tmp_path / "out"
    device = [] if "--device" in args else ["--device", "cpu"]
    rc = cli.main(["bench", "--json", "--no-plots", "--out", str(out), "--repeats", "2", *device, *args])
    captured = capsys.readouterr()
    assert rc == code, captured.err
    results = json.loads(captured.out)
    assert json.loads((out / "results.json").read_text()) == results
    return results


def _rows(results: dict, backend: str) -> list[dict]:
    return [r for r in results["rows"] if r["backend"] == backend]


# ------------------------------------------------------------------------------------------- harness


def test_synthetic_is_seeded() -> None:
    a = harness.synthetic((3, 100, 17), "uniform", seed=5)
    assert a.shape == (3, 100, 17) and a.dtype == torch.float32
    assert torch.equal(a, harness.synthetic((3, 100, 17), "uniform", seed=5))
    assert not torch.equal(a, harness.synthetic((3, 100, 17), "uniform", seed=6))
    assert a.min() >= -1 and a.max() <= 1 and a.std() > 0.5
    g = harness.synthetic((1000, 64), "gaussian", seed=1)
    assert abs(float(g.mean())) < 0.05 and abs(float(g.std()) - 1) < 0.05


def test_synthetic_spans_several_parallel_chunks() -> None:
    n = 2 * (1 << 22) + 77
    x = harness.synthetic((n // 7 + 1, 7), "uniform", seed=3)
    flat = x.view(-1)
    chunk = 1 << 22
    # each chunk has its own stream: no two chunks repeat one another
    assert not torch.equal(flat[:1000], flat[chunk : chunk + 1000])
    assert torch.equal(x, harness.synthetic(x.shape, "uniform", seed=3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_synthetic_half_precision(dtype: torch.dtype) -> None:
    x = harness.synthetic((64, 32), "keys", dtype, seed=0)
    assert x.dtype == dtype and torch.isfinite(x).all()


def test_keys_have_outlier_channels_and_values_outlier_tokens() -> None:
    k = harness.synthetic((512, 64), "keys", seed=0)
    per_channel = k.abs().amax(dim=0)
    big = per_channel > 15
    assert int(big.sum()) == 64 // 32
    assert per_channel[~big].max() < 6
    v = harness.synthetic((512, 64), "values", seed=0)
    per_token = v.abs().amax(dim=1)
    assert int((per_token > 15).sum()) == 512 // 64
    assert torch.equal(
        harness.synthetic((8, 8), "outliers", seed=2), harness.synthetic((8, 8), "keys", seed=2)
    )


def test_parsers_reject_bad_values() -> None:
    assert harness.parse_configs("2048x128, 16x3") == [(2048, 128), (16, 3)]
    assert harness.parse_shape("2x16x8", dims=None) == (2, 16, 8)
    for bad in ("2048", "0x4", "ax3", "4x4x4", ""):
        with pytest.raises(ValueError):
            harness.parse_configs(bad)
    with pytest.raises(ValueError, match="distribution"):
        harness.parse_distribution("cauchy")
    with pytest.raises(ValueError, match="dtype"):
        harness.parse_dtype("float64")


def test_time_calls_runs_every_input_each_repeat_and_keeps_the_last_result() -> None:
    calls = []

    def fn(x: int) -> int:
        calls.append(x)
        return x * 10

    samples, last = harness.time_calls(fn, [(1,), (2,), (3,)], 4, torch.device("cpu"))
    assert len(samples) == 4 and all(s >= 0 for s in samples)
    assert calls == [1, 2, 3] * 4 and last == 30
    with pytest.raises(ValueError):
        harness.time_calls(fn, [(1,)], 0, torch.device("cpu"))
    assert harness.rotation(1000, torch.device("cpu")) == 1


def test_tables() -> None:
    rows = [{"a": 1.23456789, "b": None, "c": True}, {"a": float("inf"), "b": "x", "c": False}]
    text = harness.text_table(rows, ["a", "b", "c"]).splitlines()
    assert text[0].split() == ["a", "b", "c"] and "1.235" in text[2] and "yes" in text[2] and "NO" in text[3]
    md = harness.markdown_table(rows, ["a", "b"], ["A", "B"]).splitlines()
    assert md[0] == "| A | B |" and md[2] == "| 1.235 | - |"
    assert json.loads(harness.json_text({"x": float("inf"), "y": [1.5]})) == {"x": "inf", "y": [1.5]}


def test_paper_table() -> None:
    assert [(r.tokens, r.channels) for r in paper.LOGGED][1:9] == list(paper.CONFIGS)
    big = paper.lookup(131072, 8192)
    assert big is not None and big.cpu_ms == 84115 and big.vectorized_quantize_ms == 20.85
    assert paper.lookup(3, 3) is None
    # the vectorized quantize + dequantize moved about 10 bytes per element at roughly 230 GB/s
    assert paper.roundtrip_bytes(131072, 8192) == 10 * 131072 * 8192 + 8 * 8192
    assert 220 < paper.gbps(big, "vectorized") < 240


# ------------------------------------------------------------------------------------------- kvpack bench


@requires_numba
def test_bench_rows_are_complete_and_exact(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = _bench(tmp_path, capsys, "--configs", "64x16,33x3")
    assert results["settings"]["configs"] == ["33x3:float32", "64x16:float32"]
    env = results["environment"]
    assert env["device"] == "cpu" and env["torch"] == torch.__version__ and env["date"]
    labels = {r["backend"] for r in results["rows"]}
    assert labels == {"copy", "torch", "cpu-scalar", "cpu-scalar-columns"}
    for r in results["rows"]:
        assert r["status"] == "ok", r
        if r["backend"] == "copy":
            assert r["copy_gbps"] > 0 and r["copy_bytes"] == 2 * 4 * r["elements"]
            continue
        assert r["exact"] is True
        assert all(r[k] is not None for k in _TIMED + _ERRORS), r
        assert r["within_bound"] is True and 0 < r["max_abs_error"] <= r["bound"] * 1.0001
        assert r["repeats"] == 2
        assert r["quantize_bytes"] == r["elements"] * 5 + r["channels"] * 4
        assert r["speedup_vs_scalar"] > 0 and r["speedup_vs_torch_cpu"] > 0
    for r in _rows(results, "torch"):
        assert r["speedup_vs_torch_cpu"] == 1.0 and r["metrics_from"] == "own output"
        assert r["scales_ms"] > 0 and r["scales_bytes"] == r["elements"] * 4 + r["channels"] * 4
    for r in _rows(results, "cpu-scalar"):
        assert r["speedup_vs_scalar"] == 1.0 and r["metrics_from"] == "identical to the reference"
    for r in _rows(results, "cpu-scalar-columns"):
        assert r["scales_ms"] is None  # the column walk computes its scales inside quantize
    skipped = {s["backend"] for s in results["skipped_backends"]}
    assert {"cuda-naive", "cuda-vectorized", "torch-compile"} <= skipped


@requires_numba
def test_bench_skips_what_does_not_fit_the_row_budget(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = _bench(tmp_path, capsys, "--configs", "128x32", "--row-budget", "1e-9")
    for label in ("cpu-scalar", "cpu-scalar-columns"):
        (row,) = _rows(results, label)
        assert row["status"] == "skipped" and "--row-budget" in row["reason"] and row["quantize_ms"] is None
    (ref,) = _rows(results, "torch")  # the reference always runs, at least once
    assert ref["status"] == "ok" and ref["repeats"] == 1 and ref["exact"] is True
    report = (tmp_path / "out" / "report.md").read_text()
    assert "skipped: 128x32 `cpu-scalar` on cpu" in report


@requires_numba
def test_bench_run_budget_keeps_the_reference_and_skips_the_rest(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    results = _bench(tmp_path, capsys, "--configs", "64x16,128x32", "--budget", "1e-6")
    assert results["settings"]["budget_s"] == 1e-6
    for r in results["rows"]:
        if r["backend"] in ("torch", "copy"):
            assert r["status"] == "ok"
        else:
            assert r["status"] == "skipped" and "--budget of 1e-06 s" in r["reason"], r


def test_bench_skips_configurations_too_large_for_memory(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness, "available_memory", lambda device: 1000)
    results = _bench(tmp_path, capsys, "--configs", "64x16", "--backends", "torch")
    (row,) = results["rows"]
    assert row["status"] == "skipped" and "too large for memory" in row["reason"]


def _tamper(monkeypatch: pytest.MonkeyPatch, label: str, how: str) -> None:
    """Make one backend's runner give wrong codes ("codes") or fail ("raise")."""
    real = quant._runner

    def runner(name, *args):
        r = real(name, *args)
        if name != label:
            return r
        good = r.quantize

        def bad(x):
            if how == "raise":
                raise RuntimeError("kernel exploded")
            codes, scale, zero = good(x)
            codes = codes.clone()
            codes.view(-1)[7] += 1
            return codes, scale, zero

        r.quantize = bad
        return r

    monkeypatch.setattr(quant, "_runner", runner)


@requires_numba
def test_bench_reports_a_backend_that_is_not_exact(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tamper(monkeypatch, "cpu-scalar", "codes")
    results = _bench(tmp_path, capsys, "--configs", "64x16", "--backends", "cpu-scalar")
    (row,) = _rows(results, "cpu-scalar")
    assert row["status"] == "ok" and row["exact"] is False and row["metrics_from"] == "own output"
    (ref,) = _rows(results, "torch")
    assert row["max_abs_error"] > ref["max_abs_error"]
    assert {r["backend"] for r in quant.error_rows(results["rows"])} == {"torch", "cpu-scalar"}


@requires_numba
def test_bench_records_a_failing_backend_and_exits_nonzero(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tamper(monkeypatch, "cpu-scalar", "raise")
    results = _bench(tmp_path, capsys, "--configs", "64x16", "--backends", "cpu-scalar", code=1)
    (row,) = _rows(results, "cpu-scalar")
    assert row["status"] == "error" and "kernel exploded" in row["reason"]
    assert _rows(results, "torch")[0]["status"] == "ok"


def test_bench_other_formats_and_unavailable_backends(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = _bench(
        tmp_path,
        capsys,
        "--configs",
        "70x40",
        "--format",
        "int4-token-g32",
        "--dtype",
        "bfloat16",
        "--dist",
        "values",
        "--backends",
        "torch,cpu-scalar",
    )
    (row,) = _rows(results, "torch")
    assert row["format"] == "int4-token-g32" and row["dtype"] == "bfloat16" and row["exact"] is True
    assert row["bound"] is not None and row["within_bound"] is None  # asymmetric: the bound is indicative
    reasons = {s["backend"]: s["reason"] for s in results["skipped_backends"]}
    assert "int8-channel only" in reasons["cpu-scalar"]


def test_bench_report_from_saved_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = _bench(tmp_path, capsys, "--configs", "2048x128", "--backends", "torch")
    saved = tmp_path / "out" / "results.json"
    again = tmp_path / "again"
    rc = cli.main(["bench", "--from", str(saved), "--out", str(again), "--no-plots"])
    printed = capsys.readouterr().out
    assert rc == 0 and "2048x128" in printed and not (again / "results.json").exists()
    report = (again / "report.md").read_text()
    assert "## Beside the paper" in report and results["environment"]["date"] in report
    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    rc = cli.main(["bench", "--from", str(tmp_path / "bad.json")])
    assert rc == 2 and "not a kvpack bench results.json" in capsys.readouterr().err


def test_bench_report_and_plots(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    rc = cli.main(
        ["bench", "--configs", "2048x128", "--repeats", "1", "--backends", "torch", "--device", "cpu",
         "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert rc == 0
    assert "2048x128" in printed and "attn err (16 q)" in printed and "not measured: cuda-naive" in printed
    for name in (
        "results.json",
        "results.csv",
        "report.md",
        "time.png",
        "speedup.png",
        "bandwidth.png",
        "error.png",
    ):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    for section in (
        "## Times",
        "## Bandwidth",
        "## Speedups",
        "## Errors",
        "## Beside the paper",
        "## Skips",
    ):
        assert section in report
    assert "| 2048x128 | 4.463 |" in report  # the paper's CPU time beside ours
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert {"config", "backend", "quantize_ms", "exact", "l2_error"} <= set(header)


@pytest.mark.gpu
@requires_cuda
def test_bench_on_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    results = _bench(tmp_path, capsys, "--configs", "2048x128,1000x130", "--device", "cuda")
    assert results["environment"]["device"].startswith("cuda") and results["environment"]["cuda"]
    rows = {(r["config"], r["backend"], r["device"]): r for r in results["rows"]}
    for config in ("1000x130", "2048x128"):
        copy = rows[(config, "copy", "cuda")]
        assert copy["copy_gbps"] > 0
        ref = rows[(config, "torch-eager", "cuda")]
        assert ref["status"] == "ok" and ref["exact"] is True and ref["quantize_of_copy"] > 0
        for r in results["rows"]:
            if r["config"] != config or r["backend"] in ("copy", "torch-eager"):
                continue
            assert r["status"] == "ok", r
            if (
                r["backend"] != "torch-compile"
            ):  # compiled torch may divide differently: reported, not required
                assert r["exact"] is True, r
            if r["device"] == "cuda":
                assert r["speedup_vs_scalar"] > 0 and r["speedup_vs_torch_cpu"] > 0
        assert ("torch", "cpu") in {
            (r["backend"], r["device"]) for r in results["rows"] if r["config"] == config
        }
    labels = {r["backend"] for r in results["rows"]}
    skipped = {s["backend"] for s in results["skipped_backends"]}
    for backend in (
        "triton",
        "torch-compile",
        "cuda-naive",
        "cuda-tiled",
        "cuda-coarsened",
        "cuda-vectorized",
    ):
        assert backend in labels or backend in skipped, backend


def test_half_precision_output_rounding_is_inside_the_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # float16 x_hat carries float16 rounding on top of scale/2: the check must allow it, and only it.
    results = _bench(tmp_path, capsys, "--configs", "512x64", "--dtype", "float16", "--backends", "torch")
    (row,) = _rows(results, "torch")
    assert row["max_abs_error"] > row["bound"]
    assert row["within_bound"] is True and row["max_abs_error"] <= row["bound"] + 2.0**-11


def test_environment_names_the_commit_and_whether_the_tree_differs(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env = harness.environment(torch.device("cpu"))
    commit, dirty = env["git_commit"], env["git_dirty"]
    assert commit is None or (len(commit) == 40 and all(c in "0123456789abcdef" for c in commit))
    assert dirty is None or isinstance(dirty, bool)
    # Outside a repository both are None, not an error.
    monkeypatch.setattr(harness, "__file__", str(tmp_path / "harness.py"))
    assert harness._git_commit() is None and harness._git_dirty() is None
