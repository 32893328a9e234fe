"""KV-cache sizes: the published figure, grouped-query attention, config.json parsing, metadata bytes."""

from __future__ import annotations

import json
import math

import pytest

from kvpack import models
from kvpack.models import ModelSpec, cache_formats, from_config, kv_bytes, size_table


def test_llama3_70b_fp16_at_128k_is_40_gib_per_sequence() -> None:
    assert kv_bytes("llama-3-70b", 131072) == 42_949_672_960
    assert kv_bytes("llama-3-70b", 131072, fmt="fp16") == 40 * 2**30


@pytest.mark.parametrize("name", list(models.PRESETS))
def test_plain_formats_follow_the_formula(name: str) -> None:
    spec = models.PRESETS[name]
    tokens, batch = 1000, 3
    per_element = 2 * spec.layers * spec.kv_heads * spec.head_dim * tokens * batch
    assert kv_bytes(name, tokens, batch, "fp32") == 4 * per_element
    assert kv_bytes(name, tokens, batch, "fp16") == 2 * per_element
    assert kv_bytes(name, tokens, batch, "bf16") == 2 * per_element


def test_presets_hold_the_published_shapes() -> None:
    shapes = {name: (s.layers, s.kv_heads, s.head_dim, s.q_heads) for name, s in models.PRESETS.items()}
    assert shapes["llama-3-8b"] == (32, 8, 128, 32)
    assert shapes["llama-3-70b"] == (80, 8, 128, 64)
    assert shapes["llama-2-7b"] == (32, 32, 128, 32)
    assert shapes["mistral-7b"] == (32, 8, 128, 32)
    assert shapes["qwen2.5-7b"] == (28, 4, 128, 28)
    assert shapes["qwen2.5-72b"] == (80, 8, 128, 64)
    assert shapes["smollm2-135m"] == (30, 3, 64, 9)


def test_grouped_query_attention_counts_kv_heads_not_query_heads() -> None:
    # Same layers and head size; Llama 2 7B caches 32 heads, Llama 3 8B caches 8.
    assert kv_bytes("llama-2-7b", 4096) == 4 * kv_bytes("llama-3-8b", 4096)
    mha = ModelSpec("mha", layers=80, kv_heads=64, head_dim=128, q_heads=64)
    assert kv_bytes(mha, 131072) == 8 * kv_bytes("llama-3-70b", 131072)


def test_quantized_sizes_count_scales_and_zero_points() -> None:
    spec = ModelSpec("one", layers=1, kv_heads=1, head_dim=128)
    t, d = 128, 128
    # int8: keys int8-channel-g64 (float32 scale per channel per 64 tokens), values int8-token (one per token)
    keys = t * d + (t // 64) * d * 4
    values = t * d + t * 4
    assert kv_bytes(spec, t, 1, "int8") == keys + values == 34304
    # int4: half-byte codes, float16 scale and zero point
    keys = t * d // 2 + (t // 64) * d * 2 * 2
    values = t * d // 2 + t * 2 * 2
    assert kv_bytes(spec, t, 1, "int4") == keys + values == 17920
    # int2: quarter-byte codes; values in groups of 32 channels (4 groups of a float16 scale and zero)
    assert kv_bytes(spec, t, 1, "int2") == (t * d // 4 + 2 * d * 4) + (t * d // 4 + t * 4 * 4)
    # fp8: one byte codes, float32 scales like int8
    assert kv_bytes(spec, t, 1, "fp8") == kv_bytes(spec, t, 1, "int8")
    # a partial group of tokens still holds a whole row of scales
    assert kv_bytes(spec, 65, 1, ("int8-channel-g64", "fp16")) == 65 * d + 2 * d * 4 + 65 * d * 2


def test_every_sequence_layer_and_head_has_its_own_scales() -> None:
    spec = ModelSpec("m", layers=2, kv_heads=3, head_dim=64)
    one = kv_bytes(ModelSpec("s", layers=1, kv_heads=1, head_dim=64), 100, 1, "int4")
    assert kv_bytes(spec, 100, 5, "int4") == 5 * 2 * 3 * one


def test_cache_formats() -> None:
    assert cache_formats("int8") == ("int8-channel-g64", "int8-token")
    assert cache_formats("int2") == ("int2-channel-g64", "int2-token-g32")
    assert cache_formats("fp8") == ("fp8-e4m3-channel-g64", "fp8-e4m3-token")
    assert cache_formats("fp8-e5m2") == ("fp8-e5m2-token", "fp8-e5m2-token")
    assert cache_formats("fp16") == ("fp16", "fp16")
    assert cache_formats("int4-token-g32") == ("int4-token-g32", "int4-token-g32")
    assert cache_formats(("int8-channel", "fp16")) == ("int8-channel", "fp16")
    with pytest.raises(ValueError, match="unknown format"):
        cache_formats("int3")


def test_size_table_ratios() -> None:
    rows = {r["format"]: r for r in size_table("llama-3-70b", 131072)}
    assert list(rows) == list(models.SIZE_FORMATS)
    assert rows["fp16"]["vs_fp16"] == 1.0 and rows["fp32"]["vs_fp16"] == 2.0
    assert rows["fp16"]["bytes"] == 42_949_672_960
    # per element: keys 1 + 4/64 (a float32 scale per channel per 64 tokens), values 1 + 4/128
    assert rows["int8"]["vs_fp16"] == (1 + 4 / 64 + 1 + 4 / 128) / 2 / 2 == 0.5234375
    # int4: half a byte, plus a float16 scale and zero point (4 bytes) per group
    assert rows["int4"]["vs_fp16"] == (0.5 + 4 / 64 + 0.5 + 4 / 128) / 2 / 2
    assert rows["int2"]["bytes"] < rows["int4"]["bytes"] < rows["fp8"]["bytes"]
    assert math.isclose(rows["fp16"]["gib"], 40.0)


def _write(path, cfg: dict) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def test_config_json_with_gqa_and_explicit_head_dim(tmp_path) -> None:
    cfg = {
        "_name_or_path": "org/model",
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "hidden_size": 8192,
        "head_dim": 128,
        "max_position_embeddings": 131072,
    }
    spec = from_config(_write(tmp_path / "config.json", cfg))
    assert (spec.name, spec.layers, spec.kv_heads, spec.head_dim, spec.q_heads) == (
        "org/model",
        80,
        8,
        128,
        64,
    )
    assert spec.context == 131072
    assert kv_bytes(spec, 131072) == 42_949_672_960
    assert models.get(str(tmp_path)) == spec  # a folder holding config.json


def test_config_json_defaults(tmp_path) -> None:
    cfg = {"num_hidden_layers": 12, "num_attention_heads": 12, "hidden_size": 768}
    spec = from_config(_write(tmp_path / "config.json", cfg))
    assert (spec.kv_heads, spec.head_dim, spec.context) == (12, 64, None)
    cfg["head_dim"] = None
    cfg["num_key_value_heads"] = None
    assert from_config(_write(tmp_path / "config.json", cfg)).head_dim == 64


def test_config_json_text_config(tmp_path) -> None:
    text = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "hidden_size": 576}
    spec = from_config(_write(tmp_path / "config.json", {"model_type": "vlm", "text_config": text}))
    assert (spec.layers, spec.kv_heads, spec.head_dim) == (30, 3, 64)
    assert kv_bytes(spec, 1000) == kv_bytes("smollm2-135m", 1000)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"num_attention_heads": 8, "hidden_size": 512}, "num_hidden_layers"),
        ({"num_hidden_layers": 2, "num_attention_heads": 0, "hidden_size": 512}, "num_attention_heads"),
        ({"num_hidden_layers": 2, "num_attention_heads": 6, "hidden_size": 512}, "not divisible"),
        (
            {"num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 3, "head_dim": 64},
            "multiple",
        ),
        ([1, 2], "JSON object"),
    ],
)
def test_bad_config_json(tmp_path, cfg, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_config(_write(tmp_path / "config.json", cfg))


def test_bad_inputs(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        from_config(tmp_path / "config.json")
    with pytest.raises(ValueError, match="no model config"):
        from_config(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="llama-3-70b"):
        models.get("gpt-5")
    with pytest.raises(ValueError, match="tokens"):
        kv_bytes("llama-3-8b", 0)
    with pytest.raises(ValueError, match="batch"):
        kv_bytes("llama-3-8b", 10, batch=0)
    with pytest.raises(ValueError, match="layers"):
        ModelSpec("x", layers=0, kv_heads=1, head_dim=1)
