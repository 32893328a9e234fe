"""A quantized KV cache for Hugging Face transformers (5.x), built on :class:`kvpack.cache.QuantizedLayer`.

>>> from kvpack.hf import QuantizedKVCache
>>> cache = QuantizedKVCache(model.config, key_format="int8-channel-g64", value_format="int8-token")
>>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=256)
>>> cache.nbytes, cache.fp16_nbytes     # bytes held, and what a float16 cache would hold

Each decoder layer gets a :class:`QuantizedLayer`; it allocates its storage on the device of the first
keys and values it receives, so a model spread over several devices keeps each layer's cache beside
the layer. Two modes:

- ``attention="dequantize"``: ``update`` appends, then returns the whole cache dequantized (a
  temporary, as :class:`transformers.DynamicCache` would return it); any attention function works.
- ``attention="fused"``: ``update`` appends, then returns the new keys and values only, tagged with
  ``_kvpack_layer`` (the layer, after the append) and ``_kvpack_past`` (tokens it held before), for the
  attention function registered as ``"kvpack"``, which reads the quantized store directly. Chosen by
  default when ``config._attn_implementation`` is ``"kvpack"``.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

import kvpack.hf_attention  # noqa: F401  (registers attn_implementation="kvpack" with transformers)
from kvpack.backends import Backend
from kvpack.cache import CACHE_PRESETS, QuantizedLayer, block_scheme, cache_formats, check_head_dim
from kvpack.schemes import Scheme

try:
    from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvpack.hf needs transformers 5.x: pip install 'kvpack[hf]' (or pip install 'transformers>=5,<6')"
    ) from err

Attention = Literal["dequantize", "fused"]


def _config_value(config: Any, name: str) -> Any:
    value = getattr(config, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_shape(config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_kv_heads, head_dim)`` of a decoder config, or a ValueError saying what is missing.

    Only full-attention layers are served: sliding-window, chunked, linear-attention and shared-KV layers
    are refused.
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    layers = _config_value(config, "num_hidden_layers")
    heads = _config_value(config, "num_attention_heads")
    if layers is None or heads is None:
        raise ValueError(
            f"{type(config).__name__} has no positive num_hidden_layers / num_attention_heads; "
            "QuantizedKVCache serves decoder-only transformer configs (Llama, Mistral, Qwen2, SmolLM, ...)"
        )
    kv_heads = _config_value(config, "num_key_value_heads") or heads
    head_dim = _config_value(config, "head_dim")
    hidden = _config_value(config, "hidden_size")
    if head_dim is None:
        if hidden is None or hidden % heads:
            raise ValueError(
                f"cannot derive the head dimension of {type(config).__name__}: no head_dim, and hidden_size "
                f"{getattr(config, 'hidden_size', None)} is not a multiple of num_attention_heads {heads}"
            )
        head_dim = hidden // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    try:
        layer_types = list(get_layer_types_and_kwargs(config)[0])
    except (AttributeError, TypeError) as err:
        raise ValueError(f"cannot read the layer types of {type(config).__name__}: {err}") from None
    unsupported = sorted({t for t in layer_types if t != "full_attention"})
    if unsupported or len(layer_types) != layers:
        raise ValueError(
            "QuantizedKVCache serves full-attention layers only; this config has "
            f"{', '.join(unsupported) or 'shared'} layers ({len(layer_types)} cached of {layers}); "
            "use transformers' DynamicCache for this model"
        )
    return layers, kv_heads, head_dim


class QuantizedCacheLayer(CacheLayerMixin):
    """The transformers face of one :class:`QuantizedLayer` (``self.quantized``)."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, quantized: QuantizedLayer) -> None:
        super().__init__()
        self.quantized = quantized

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append, then return the whole cache dequantized ``[B, H, seq_length, D]``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.quantized.append(key_states, value_states)
        return self.quantized.dequantized()

    def get_seq_length(self) -> int:
        return self.quantized.seq_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.quantized.seq_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.quantized.reset()
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.quantized.index_select(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        indices = torch.as_tensor(indices)
        if indices.dtype == torch.bool:
            indices = indices.nonzero().squeeze(-1)
        self.quantized.index_select(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.quantized.repeat_interleave(repeats)

    def crop(self, tokens_to_remove: int) -> None:
        """Negative: drop that many tokens from the end; 0: nothing; positive: keep that many (the older
        transformers 5.x meaning of ``crop(max_length)``)."""
        if tokens_to_remove:
            self.quantized.crop(tokens_to_remove)

    def offload(self) -> None:
        raise NotImplementedError("QuantizedKVCache does not offload layers to the CPU")

    def prefetch(self) -> None:
        raise NotImplementedError("QuantizedKVCache does not offload layers to the CPU")

    def __repr__(self) -> str:
        return repr(self.quantized)


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` that stores keys and values quantized, a residual window in full precision.

    Args:
        config: the model's config (``model.config``): gives the number of layers and checks the head
            dimension against the formats. Only full-attention decoder layers are served.
        key_format, value_format: kvpack format names or Schemes; default ``int8-channel-g64`` keys and
            ``int8-token`` values. Keys are best per-channel, in groups of ``group`` tokens.
        preset: instead of the two formats, one of ``int8``, ``int4``, ``int2``, ``fp8``
            (:data:`kvpack.cache.CACHE_PRESETS`).
        residual: the most recent tokens kept in full precision (until a whole group can be quantized).
        group: tokens per quantized block (default: the key format's token group, else 64).
        backend: kvpack backend for quantize/dequantize (``"auto"``).
        attention: ``"dequantize"`` or ``"fused"`` (see the module doc); None picks ``"fused"`` when the
            model's attention implementation is kvpack's.
        max_length: if known, the longest sequence the cache will hold (prompt + new tokens): the
            quantized store is then allocated once, exactly. Otherwise it is sized exactly by the prompt
            and grows by 1.5x when decoding passes it, so ``nbytes`` (allocated bytes) can exceed the
            bytes of the valid tokens by up to half the quantized store.

    Raises:
        ValueError: unknown format, a group size that does not fit the head dimension or the block, or a
            config the cache cannot serve.
    """

    def __init__(
        self,
        config: Any,
        key_format: str | Scheme | None = None,
        value_format: str | Scheme | None = None,
        residual: int = 128,
        group: int | None = None,
        backend: Backend | str = "auto",
        attention: Attention | None = None,
        preset: str | None = None,
        max_length: int | None = None,
    ) -> None:
        if preset is not None:
            if key_format is not None or value_format is not None:
                raise ValueError("give either preset= or key_format=/value_format=, not both")
            if preset not in CACHE_PRESETS:
                raise ValueError(f"unknown cache preset {preset!r}; choose one of {', '.join(CACHE_PRESETS)}")
            key_format, value_format = CACHE_PRESETS[preset]
        default_key, default_value = CACHE_PRESETS["int8"]
        key, value = cache_formats(f"{key_format or default_key}/{value_format or default_value}")
        if attention not in (None, "dequantize", "fused"):
            raise ValueError(f"attention must be 'dequantize' or 'fused', got {attention!r}")
        num_layers, self.num_kv_heads, self.head_dim = model_shape(config)
        layers = [QuantizedCacheLayer(QuantizedLayer(key, value, residual, group, backend))
                  for _ in range(num_layers)]
        first = layers[0].quantized
        for scheme, role in ((first.key_scheme, "key"), (first.value_scheme, "value")):
            check_head_dim(block_scheme(scheme, first.group, role), self.head_dim, role)
        if max_length is not None:
            for layer in layers:
                layer.quantized.reserve(max_length)
        super().__init__(layers=layers)
        self.config = config
        self.attention = attention

    @classmethod
    def from_preset(cls, config: Any, preset: str, **kwargs: Any) -> QuantizedKVCache:
        """``QuantizedKVCache(config, preset=preset, **kwargs)``: ``int8``, ``int4``, ``int2`` or ``fp8``."""
        return cls(config, preset=preset, **kwargs)

    @property
    def quantized_layers(self) -> list[QuantizedLayer]:
        """The :class:`QuantizedLayer` of every decoder layer."""
        return [layer.quantized for layer in self.layers]

    def fused(self) -> bool:
        """Whether ``update`` hands the attention function the new tokens and the layer (kvpack attention)."""
        impl = str(getattr(self.config, "_attn_implementation", None) or "")
        if self.attention == "fused" and impl and not impl.startswith("kvpack"):
            raise ValueError(
                f"QuantizedKVCache(attention='fused') needs the model's attention to be kvpack's, but it is "
                f"{impl!r}: load the model with attn_implementation='kvpack' (import kvpack.hf_attention) or "
                "use attention='dequantize'"
            )
        if self.attention is not None:
            return self.attention == "fused"
        return impl.startswith("kvpack")

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        cache_kwargs: dict[str, Any] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``key_states`` / ``value_states`` ``[B, kv_heads, n, head_dim]`` to layer ``layer_idx``.

        Returns the whole cache dequantized ``[B, kv_heads, past + n, head_dim]`` (dequantize mode), or the
        inputs themselves tagged with ``_kvpack_layer`` and ``_kvpack_past`` (fused mode).
        """
        if not 0 <= layer_idx < len(self.layers):
            raise IndexError(f"layer_idx {layer_idx} is out of range: the cache has {len(self.layers)}")
        layer = self.layers[layer_idx]
        if not self.fused():
            return layer.update(key_states, value_states)
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        past = layer.quantized.seq_length
        layer.quantized.append(key_states, value_states)
        for t in (key_states, value_states):
            t._kvpack_layer = layer.quantized
            t._kvpack_past = past
        return key_states, value_states

    @property
    def nbytes(self) -> int:
        """Bytes allocated by the cache (codes, scales, zero points and windows of all layers)."""
        return sum(layer.nbytes for layer in self.quantized_layers)

    @property
    def fp16_nbytes(self) -> int:
        """Bytes a float16 cache of the same tokens would hold."""
        return sum(layer.fp16_nbytes for layer in self.quantized_layers)

    def __repr__(self) -> str:
        first = self.quantized_layers[0]
        return (
            f"QuantizedKVCache(layers={len(self.layers)}, keys={first.key_scheme.name}, "
            f"values={first.value_scheme.name}, group={first.group}, residual={first.residual}, "
            f"tokens={self.get_seq_length()}, nbytes={self.nbytes}, fp16_nbytes={self.fp16_nbytes})"
        )
