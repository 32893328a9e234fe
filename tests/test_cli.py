"""The ``kvpack`` command through ``main([...])``: each subcommand on tiny inputs: JSON, help, errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvpack import cli

MINE = ("bench", "accuracy", "size")


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_help_lists_every_command(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = _run(capsys, "--help")
    assert rc == 0
    for name in cli.COMMANDS:
        assert name in out
    rc, out, _ = _run(capsys, "--version")
    assert rc == 0 and out.startswith("kvpack ")


@pytest.mark.parametrize("command", MINE)
def test_command_help_explains_and_offers_json(capsys: pytest.CaptureFixture, command: str) -> None:
    rc, out, _ = _run(capsys, command, "--help")
    assert rc == 0
    assert "--json" in out and len(out) > 400


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS if c not in MINE])
def test_other_commands_load_or_say_they_are_missing(capsys: pytest.CaptureFixture, command: str) -> None:
    rc, out, err = _run(capsys, command, "--help")
    assert (rc == 0 and "--json" in out) or (rc == 2 and "not available" in err)


def test_size_json(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = _run(capsys, "size", "--model", "llama-3-70b", "--json")
    assert rc == 0
    data = json.loads(out)
    assert data["tokens"] == 131072 and data["batch"] == 1
    rows = {r["format"]: r for r in data["rows"]}
    assert rows["fp16"]["bytes"] == 42_949_672_960
    assert rows["int8"]["keys"] == "int8-channel-g64" and rows["int8"]["values"] == "int8-token"


def test_size_table_from_explicit_numbers(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = _run(
        capsys, "size", "--layers", "80", "--kv-heads", "8", "--head-dim", "128", "--batch", "2"
    )
    assert rc == 0
    assert "85,899,345,920" in out  # two sequences of Llama 3 70B's cache at 128K tokens
    assert "keys per channel in blocks of 64 tokens" in out
    for fmt in ("fp32", "fp16", "fp8", "int8", "int4", "int2"):
        assert f"\n{fmt}" in out or f" {fmt} " in out


def test_size_from_config_uses_its_context(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = {
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_size": 256,
        "max_position_embeddings": 1024,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    rc, out, _ = _run(capsys, "size", "--model", str(path), "--json")
    data = json.loads(out)
    assert rc == 0 and data["tokens"] == 1024
    assert {r["format"]: r["bytes"] for r in data["rows"]}["fp16"] == 2 * 2 * 2 * 64 * 1024 * 2


def test_size_lists_models(capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = _run(capsys, "size", "--list-models")
    assert rc == 0 and "llama-3-70b" in out and "smollm2-135m" in out
    rc, out, _ = _run(capsys, "size", "--list-models", "--json")
    assert {m["name"] for m in json.loads(out)} >= {"llama-3-8b", "qwen2.5-72b", "mistral-7b"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["size"], "give --model"),
        (["size", "--model", "gpt-9"], "unknown model"),
        (["size", "--model", "llama-3-8b", "--layers", "3"], "not both"),
        (["size", "--layers", "0", "--kv-heads", "1", "--head-dim", "1"], "layers"),
        (["size", "--model", "llama-3-8b", "--tokens", "0"], "tokens"),
        (["bench", "--configs", "2048"], "bad shape"),
        (["bench", "--repeats", "0"], "--repeats"),
        (["bench", "--format", "int3-channel"], "unknown format"),
        (["bench", "--backends", "fastest"], "unknown backend"),
        (["bench", "--device", "tpu"], "device"),
        (["accuracy", "--dist", "cauchy"], "unknown distribution"),
        (["accuracy", "--shape", "12"], "bad shape"),
    ],
)
def test_kvpack_errors_exit_2_without_traceback(
    capsys: pytest.CaptureFixture, argv: list[str], message: str
) -> None:
    rc, _, err = _run(capsys, *argv)
    assert rc == 2
    assert err.startswith("kvpack: error:") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv", [["frobnicate"], ["size", "--tokens", "many"], ["bench", "--dtype", "float64"], []]
)
def test_bad_arguments_exit_2_with_usage(capsys: pytest.CaptureFixture, argv: list[str]) -> None:
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and "usage: kvpack" in err


def test_a_missing_command_module_is_reported(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("kvpack.no_such_module", "a command not installed"))
    rc, _, err = _run(capsys, "ghost")
    assert rc == 2 and "the 'ghost' command is not available" in err
    rc, out, _ = _run(capsys, "size", "--list-models")  # the others still work
    assert rc == 0 and "llama-3-8b" in out


def test_a_missing_dependency_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "kvpack_ghost_cmd.py").write_text("import kvpack_missing_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "ghost", ("kvpack_ghost_cmd", "needs a package"))
    rc, _, err = _run(capsys, "ghost", "--help")
    assert rc == 2 and "kvpack_missing_dependency_xyz" in err and "not installed" in err
    sys.modules.pop("kvpack_ghost_cmd", None)


def test_accuracy_shows_which_axis_wins(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "acc"
    rc, printed, _ = _run(capsys, "accuracy", "--shape", "512x64", "--out", str(out), "--json", "--no-plots")
    assert rc == 0
    data = json.loads(printed)
    assert json.loads((out / "accuracy.json").read_text()) == data
    assert (out / "accuracy.csv").stat().st_size > 0 and "## keys" in (out / "accuracy.md").read_text()
    assert {r["dist"] for r in data["rows"]} == {"uniform", "gaussian", "keys", "values"}
    assert len(data["rows"]) == 4 * len(data["settings"]["formats"])
    finding = {line.split(" ")[0]: line for line in data["findings"]}
    assert "per-channel scales win" in finding["keys"]
    assert "per-token scales win" in finding["values"]
    rows = {(r["dist"], r["format"]): r for r in data["rows"]}
    keys_c, keys_t = rows[("keys", "int8-channel")], rows[("keys", "int8-token")]
    assert keys_c["relative_l2_error"] < keys_t["relative_l2_error"]
    vals_c, vals_t = rows[("values", "int8-channel")], rows[("values", "int8-token")]
    assert vals_t["attention_output_error"] < vals_c["attention_output_error"]
    assert vals_t["attention_kl"] is None and keys_t["attention_kl"] > 0
    assert rows[("uniform", "int8-channel")]["max_abs_error"] < 0.004


def test_accuracy_table_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "acc"
    rc, printed, _ = _run(
        capsys,
        "accuracy",
        "--shape",
        "2x64x32",
        "--dist",
        "keys",
        "--formats",
        "int8-channel,int8-token",
        "--out",
        str(out),
    )
    assert rc == 0
    assert "keys (quantized as keys)" in printed and "int8-token" in printed
    assert (out / "accuracy.png").stat().st_size > 0
