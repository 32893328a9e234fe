"""QuantizedKVCache inside transformers: tiny random Llama models (one with grouped-query attention),
against DynamicCache and the plain-torch reference."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from conftest import requires_cuda

pytest.importorskip("transformers")
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, MistralConfig  # noqa: E402

from kvpack import metrics, reference  # noqa: E402
from kvpack.cache import QuantizedLayer  # noqa: E402
from kvpack.hf import QuantizedKVCache  # noqa: E402
from kvpack.schemes import Scheme  # noqa: E402

VOCAB = 128


def tiny_config(kv_heads: int = 2, layers: int = 2, head_dim: int = 16) -> LlamaConfig:
    return LlamaConfig(hidden_size=4 * head_dim, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=head_dim,
                       vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2)


@pytest.fixture(scope="module", params=[2, 4], ids=["gqa", "mha"])
def model(request) -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_config(kv_heads=request.param)).eval()
    m.generation_config.pad_token_id = 0
    return m


@pytest.fixture(scope="module")
def gqa_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_config(kv_heads=2)).eval()
    m.generation_config.pad_token_id = 0
    return m


def int8_cache(model: LlamaForCausalLM, **kwargs) -> QuantizedKVCache:
    kwargs.setdefault("residual", 16)
    return QuantizedKVCache(model.config, key_format="int8-channel-g16", value_format="int8-token", **kwargs)


def block_round_trip(x: torch.Tensor, layer: QuantizedLayer, scheme: Scheme) -> torch.Tensor:
    """The reference quantize-dequantize of ``x [B, H, T, D]``: whole blocks of keys, the rest exact."""
    b, h, t, d = x.shape
    nq = layer.num_quantized
    parts = []
    for start in range(0, nq, layer.group):
        blk = x[:, :, start : start + layer.group].reshape(b * h, -1, d)
        codes, scale, zero = reference.quantize(blk, scheme)
        deq = reference.dequantize(codes, scale, zero, scheme, d, x.dtype)
        parts.append(deq.reshape(b, h, -1, d))
    return torch.cat([*parts, x[:, :, nq:]], dim=2)


def test_update_hands_attention_the_reference_round_trip(model):
    """Spy on update in a manual forward loop: the keys and values attention receives are the blockwise
    reference round trip of everything appended so far, window tokens exact."""
    cache = int8_cache(model)
    appended: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    returned: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    update = cache.update

    def spy(key_states, value_states, layer_idx, *args, **kwargs):
        appended.setdefault(layer_idx, []).append((key_states.clone(), value_states.clone()))
        keys, values = update(key_states, value_states, layer_idx, *args, **kwargs)
        returned[layer_idx] = (keys.clone(), values.clone())
        return keys, values

    cache.update = spy
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 70))
    with torch.no_grad():
        model(ids[:, :37], past_key_values=cache)
        for i in range(37, 70):
            model(ids[:, i : i + 1], past_key_values=cache)
            for idx, layer in enumerate(cache.quantized_layers):
                assert layer.seq_length == i + 1
                for j, scheme in ((0, layer.key_scheme), (1, layer.value_scheme)):
                    sent = torch.cat([kv[j] for kv in appended[idx]], dim=2)
                    want = block_round_trip(sent, layer, scheme)
                    torch.testing.assert_close(returned[idx][j], want, rtol=0, atol=0)
    assert cache.quantized_layers[0].num_quantized == 64


def test_int8_logits_close_to_dynamic_cache(model):
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (2, 160))
    with torch.no_grad():
        ref_cache, cache = DynamicCache(config=model.config), int8_cache(model)
        ref = [model(ids[:, :100], past_key_values=ref_cache).logits]
        got = [model(ids[:, :100], past_key_values=cache).logits]
        for i in range(100, 160):
            ref.append(model(ids[:, i : i + 1], past_key_values=ref_cache).logits)
            got.append(model(ids[:, i : i + 1], past_key_values=cache).logits)
    assert cache.quantized_layers[0].num_quantized == 144
    assert metrics.sqnr_db(torch.cat(ref, 1), torch.cat(got, 1)) >= 30


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "fp8"])
def test_presets_run_and_shrink_the_cache(fmt):
    torch.manual_seed(10)
    model = LlamaForCausalLM(tiny_config(head_dim=32)).eval()
    cache = QuantizedKVCache.from_preset(model.config, fmt, residual=0, group=None)
    with torch.no_grad():
        model(torch.randint(3, VOCAB, (1, 256)), past_key_values=cache)
    assert cache.get_seq_length() == 256 and cache.quantized_layers[0].num_quantized == 256
    assert cache.nbytes < cache.fp16_nbytes


def test_memory_targets_smollm2_shapes():
    """The whole cache of SmolLM2-135M's shapes (30 layers, 3 KV heads, head dim 64) at 8192 tokens (one
    layer is filled, the others hold copies of it)."""
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, vocab_size=VOCAB)
    torch.manual_seed(3)
    x = torch.randn(1, 3, 8192, 64, dtype=torch.float16)
    for preset, target in (("int8", 0.56), ("int4", 0.31)):
        cache = QuantizedKVCache(config, preset=preset, residual=128)
        cache.quantized_layers[0].append(x, x)
        for layer in cache.layers[1:]:
            layer.quantized = copy.deepcopy(cache.quantized_layers[0])
        assert cache.fp16_nbytes == 30 * 2 * 3 * 8192 * 64 * 2
        held = sum(t.numel() * t.element_size() for layer in cache.quantized_layers for t in layer._held())
        assert cache.nbytes == held
        assert cache.nbytes / cache.fp16_nbytes <= target


def _fill_pair(model, ids):
    """A quantized cache after prefill and decode, and a DynamicCache holding what it dequantizes to."""
    cache = int8_cache(model, residual=8)
    with torch.no_grad():
        model(ids[:, :50], past_key_values=cache)
        for i in range(50, 53):
            model(ids[:, i : i + 1], past_key_values=cache)
    dense = DynamicCache()
    for idx, layer in enumerate(cache.quantized_layers):
        k, v = layer.dequantized()
        dense.update(k.clone(), v.clone(), idx)
    return cache, dense


def _same(cache: QuantizedKVCache, dense: DynamicCache) -> None:
    assert cache.get_seq_length() == dense.get_seq_length()
    for layer, ref in zip(cache.quantized_layers, dense.layers, strict=True):
        k, v = layer.dequantized()
        assert torch.equal(k, ref.keys) and torch.equal(v, ref.values)


@pytest.mark.parametrize(
    "op",
    [
        lambda c: c.reorder_cache(torch.tensor([2, 2, 0, 1])),
        lambda c: c.batch_select_indices(torch.tensor([3, 1])),
        lambda c: c.batch_repeat_interleave(3),
        lambda c: c.crop(-2),
        lambda c: c.crop(-20),
        lambda c: c.crop(0),
    ],
    ids=["reorder", "select", "repeat", "crop-window", "crop-store", "crop-0"],
)
def test_cache_operations_behave_as_dynamic_cache(gqa_model, op):
    torch.manual_seed(4)
    ids = torch.randint(3, VOCAB, (4, 60))
    cache, dense = _fill_pair(gqa_model, ids)
    _same(cache, dense)
    op(cache)
    op(dense)
    _same(cache, dense)
    assert cache.get_mask_sizes(1, 0) == dense.get_mask_sizes(1, 0)


def test_reset_and_lengths(gqa_model):
    cache = int8_cache(gqa_model)
    assert cache.get_seq_length() == 0 and cache.get_max_length() == -1 and not cache.is_compileable
    with torch.no_grad():
        gqa_model(torch.randint(3, VOCAB, (1, 20)), past_key_values=cache)
    assert cache.get_seq_length() == 20 and cache.nbytes > 0
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes == 0


def test_generate_lossless_cache_matches_dynamic_cache(model):
    """With a window longer than the sequence nothing is quantized: generate must then give exactly the
    tokens DynamicCache gives, for greedy and beam search (which reorders the cache)."""
    torch.manual_seed(5)
    ids = torch.randint(3, VOCAB, (2, 12))
    for kwargs in ({"do_sample": False}, {"num_beams": 3, "do_sample": False}):
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, **kwargs)
        cache = QuantizedKVCache(model.config, residual=1000)
        got = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=10, **kwargs)
        assert torch.equal(got, ref), kwargs


@pytest.mark.parametrize("mode", ["greedy", "sample", "beam"])
def test_generate_with_a_quantized_cache(gqa_model, mode):
    torch.manual_seed(6)
    ids = torch.randint(3, VOCAB, (2, 40))
    kwargs = {"greedy": {"do_sample": False}, "sample": {"do_sample": True, "top_k": 10},
              "beam": {"num_beams": 2, "do_sample": False}}[mode]
    cache = int8_cache(gqa_model, residual=4)
    out = gqa_model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=30, **kwargs)
    assert out.shape == (2, 70)
    assert cache.get_seq_length() == 69 and cache.quantized_layers[0].num_quantized == 64
    if mode == "greedy":
        ref = gqa_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
        assert (out == ref).float().mean() >= 0.9


def test_left_padded_batch_matches_each_sequence(gqa_model):
    torch.manual_seed(7)
    long, short = torch.randint(3, VOCAB, (1, 60)), torch.randint(3, VOCAB, (1, 45))
    ids = torch.cat([long, torch.cat([torch.zeros(1, 15, dtype=torch.long), short], 1)])
    mask = torch.cat([torch.ones(1, 60), torch.cat([torch.zeros(1, 15), torch.ones(1, 45)], 1)]).long()
    with torch.no_grad():
        batch = gqa_model(ids, attention_mask=mask, past_key_values=int8_cache(gqa_model)).logits
        for row, seq in enumerate((long, short)):
            alone = gqa_model(seq, past_key_values=int8_cache(gqa_model)).logits[0]
            assert metrics.sqnr_db(alone, batch[row, -seq.shape[1] :]) >= 30


def test_fused_mode_returns_new_tokens_tagged_with_the_layer(gqa_model):
    cache = QuantizedKVCache(gqa_model.config, residual=16, attention="fused")
    cache.config = SimpleNamespace(_attn_implementation="kvpack")
    torch.manual_seed(8)
    k, v = torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    keys, values = cache.update(k, v, 1)
    assert keys is k and values is v and keys._kvpack_past == 0
    assert keys._kvpack_layer is cache.quantized_layers[1] and values._kvpack_layer is keys._kvpack_layer
    keys, _ = cache.update(k[:, :, :1], v[:, :, :1], 1)
    assert keys.shape[2] == 1 and keys._kvpack_past == 40 and keys._kvpack_layer.seq_length == 41
    config = tiny_config()
    assert not QuantizedKVCache(config).fused()
    config._attn_implementation = "kvpack"
    assert QuantizedKVCache(config).fused() and not QuantizedKVCache(config, attention="dequantize").fused()


def test_fused_mode_refuses_another_attention(gqa_model):
    cache = QuantizedKVCache(gqa_model.config, attention="fused")
    with pytest.raises(ValueError, match="attn_implementation='kvpack'"), torch.no_grad():
        gqa_model(torch.randint(3, VOCAB, (1, 8)), past_key_values=cache)


def test_each_layer_keeps_its_inputs_device_and_dtype(gqa_model):
    """Layers allocate lazily from the tensors they receive (here two dtypes stand in for two devices)."""
    cache = int8_cache(gqa_model)
    cache.update(torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16), 0)
    half = torch.randn(1, 2, 5, 16, dtype=torch.float16)
    cache.update(half, half, 1)
    first, second = cache.quantized_layers
    assert first.dtype == torch.float32 and second.dtype == torch.float16
    assert all(t.device.type == "cpu" for layer in (first, second) for t in layer._held())


@pytest.mark.parametrize(
    ("config", "kwargs", "match"),
    [
        (tiny_config(), {"key_format": "int9-channel"}, "unknown format"),
        (tiny_config(), {"value_format": "int8-token-g12"}, "does not divide the head dimension 16"),
        (tiny_config(), {"key_format": "int8-channel-g32", "group": 64}, "blocks of 64"),
        (tiny_config(), {"key_format": "int8-channel"}, "no token group"),
        (tiny_config(), {"preset": "int3"}, "unknown cache preset"),
        (tiny_config(), {"preset": "int8", "key_format": "int8-token"}, "not both"),
        (tiny_config(), {"attention": "flash"}, "dequantize' or 'fused"),
        (SimpleNamespace(hidden_size=64), {}, "num_hidden_layers"),
        (SimpleNamespace(num_hidden_layers=2, num_attention_heads=4, hidden_size=66), {}, "head dimension"),
        (MistralConfig(num_hidden_layers=2, sliding_window=64), {}, "sliding_attention"),
    ],
)
def test_bad_arguments(config, kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizedKVCache(config, **kwargs)


@requires_cuda
def test_generate_on_the_gpu():
    model = LlamaForCausalLM(tiny_config()).to("cuda", torch.float16).eval()
    ids = torch.randint(3, VOCAB, (2, 100), device="cuda")
    cache = int8_cache(model)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=40,
                         do_sample=False)
    assert out.shape == (2, 140)
    assert all(t.device.type == "cuda" for layer in cache.quantized_layers for t in layer._held())


def _check_device_map(layer_devices: list[str | int]) -> None:
    """A 4-layer model dispatched with layer ``i`` on ``layer_devices[i]`` (embeddings on the first
    layer's device, norm and head on the last's) generates with a quantized cache, and each layer's
    cache lives where its layer runs."""
    from accelerate import dispatch_model

    torch.manual_seed(9)
    first, last = layer_devices[0], layer_devices[-1]
    dtype = torch.float16 if "cpu" not in layer_devices else torch.float32
    model = LlamaForCausalLM(tiny_config(layers=len(layer_devices))).to(dtype).eval()
    device_map = {"model.embed_tokens": first, "model.rotary_emb": first, "model.norm": last, "lm_head": last,
                  **{f"model.layers.{i}": dev for i, dev in enumerate(layer_devices)}}
    # main_device "cpu": layers mapped to the CPU run there (otherwise accelerate offloads their weights
    # and runs them on the first GPU).
    main = "cpu" if "cpu" in layer_devices else None
    model = dispatch_model(model, device_map=device_map, main_device=main)
    cache = int8_cache(model)
    ids = torch.randint(3, VOCAB, (2, 50), device=_torch_device(first))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=20,
                         do_sample=False)
    assert out.shape == (2, 70)
    for layer, dev in zip(cache.quantized_layers, layer_devices, strict=True):
        assert {t.device for t in layer._held()} == {_torch_device(dev)}


def _torch_device(dev: str | int) -> torch.device:
    """An accelerate device-map entry (a GPU index or ``"cpu"``) as a torch device."""
    return torch.device("cpu" if dev == "cpu" else f"cuda:{dev}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_layers_on_two_gpus_keep_their_cache_beside_them():
    _check_device_map([0, 0, 1, 1])


@requires_cuda
def test_layers_split_between_gpu_and_cpu_keep_their_cache_beside_them():
    """The one-GPU form: the first half of the layers on the GPU, the rest (and the head) offloaded to
    the CPU."""
    _check_device_map([0, 0, "cpu", "cpu"])
