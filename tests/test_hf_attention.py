"""transformers' attn_implementation="kvpack": the fused decode path against the dequantize path.

A tiny random Llama (grouped-query attention) runs with a QuantizedKVCache in fused mode (the kernel
reads the quantized store) and, with the same weights, in dequantize mode (SDPA over the dequantized
cache): logits must agree. Without a GPU the kernel runs in Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("transformers")

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

import kvpack.attention  # noqa: E402
from kvpack.hf import QuantizedKVCache  # noqa: E402
from kvpack.hf_attention import first_valid  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton and a CUDA GPU (or TRITON_INTERPRET=1)",
)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=1024)
    m = LlamaForCausalLM(config).to(DEVICE, torch.float16).eval()
    m.set_attn_implementation("kvpack")
    return m


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the query lengths that went through the decode kernel's entry point."""
    calls: list[int] = []
    real = kvpack.attention.fused

    def counted(q: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        calls.append(q.shape[2])
        return real(q, *args, **kwargs)

    monkeypatch.setattr("kvpack.hf_attention.fused", counted)
    return calls


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (x - ref).pow(2).sum()))


def inputs(batch: int = 2, length: int = 150, pad: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0  # left padding, as generate pads a batch
    return ids.to(DEVICE), mask.to(DEVICE)


@pytest.mark.parametrize("preset", ["int8", "int4", "fp8"])
def test_fused_decoding_matches_dequantize_path(model: LlamaForCausalLM, preset: str,
                                                kernel_calls: list[int]) -> None:
    ids, mask = inputs()
    fused = QuantizedKVCache(model.config, preset=preset, residual=32)
    plain = QuantizedKVCache(model.config, preset=preset, residual=32, attention="dequantize")
    assert fused.fused() and not plain.fused()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, past_key_values=fused).logits
        b = model(ids, attention_mask=mask, past_key_values=plain).logits
        assert sqnr_db(a[1, 9:], b[1, 9:]) > 40 and sqnr_db(a[0], b[0]) > 40
        # Plain decoding steps, then a 3-token (speculative) step, then a 40-token chunk (prefill path).
        for n in (1, 1, 1, 1, 3, 40, 1):
            step = torch.randint(0, 256, (2, n), generator=g).to(DEVICE)
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            a = model(step, attention_mask=mask, past_key_values=fused).logits
            b = model(step, attention_mask=mask, past_key_values=plain).logits
            assert sqnr_db(a, b) > 40, n
    layers = 2
    assert kernel_calls == [q for n in (1, 1, 1, 1, 3, 1) for q in [n] * layers]
    assert fused.get_seq_length() == plain.get_seq_length() == 150 + 48


def test_generate_with_fused_cache(model: LlamaForCausalLM, kernel_calls: list[int]) -> None:
    ids, mask = inputs(length=100)
    out = {}
    for mode in ("fused", "dequantize"):
        cache = QuantizedKVCache(model.config, preset="int8", residual=16, attention=mode)
        out[mode] = model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache,
                                   max_new_tokens=6, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True)
    assert len(kernel_calls) == 5 * 2  # five decoding steps after the prompt, two layers
    for a, b in zip(out["fused"].logits, out["dequantize"].logits, strict=True):
        assert sqnr_db(a, b) > 40
    assert torch.equal(out["fused"].sequences, out["dequantize"].sequences)


def test_other_caches_get_sdpa(model: LlamaForCausalLM, kernel_calls: list[int]) -> None:
    ids, mask = inputs(length=40)
    with torch.no_grad():
        a = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        model.set_attn_implementation("sdpa")
        try:
            b = model(ids, attention_mask=mask, past_key_values=DynamicCache(config=model.config)).logits
        finally:
            model.set_attn_implementation("kvpack")
    assert torch.equal(a, b)
    assert kernel_calls == []


def test_first_valid_reads_left_padding() -> None:
    keep = torch.ones(3, 1, 2, 10, dtype=torch.bool)
    keep[1, :, :, :4] = False
    keep[2, :, :, :9] = False
    assert first_valid(keep, 3).tolist() == [0, 4, 9]
    additive = torch.zeros(3, 1, 2, 10).masked_fill(~keep, torch.finfo(torch.float32).min)
    assert first_valid(additive, 3).tolist() == [0, 4, 9]
    assert first_valid(keep[:1], 3).tolist() == [0, 0, 0]
    assert first_valid(None, 3) is None
    with pytest.raises(ValueError, match="4-D"):
        first_valid(keep[:, 0], 3)
