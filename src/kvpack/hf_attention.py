"""kvpack's attention for transformers (5.x): ``attn_implementation="kvpack"``.

>>> import kvpack.hf_attention                       # registers "kvpack" (also done by kvpack.hf)
>>> model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="kvpack", dtype=torch.float16)
>>> cache = QuantizedKVCache(model.config, preset="int8")   # fused mode: the config names kvpack
>>> model.generate(**inputs, past_key_values=cache, max_new_tokens=256)

The function registered as ``"kvpack"`` (:func:`kvpack_attention_forward`) serves three cases:

- **Decoding** (a step of at most :data:`MAX_DECODE_QUERIES` new tokens, float16/bfloat16) with a
  :class:`kvpack.hf.QuantizedKVCache` in fused mode: the cache hands over the new keys/values tagged
  with ``_kvpack_layer``, and :func:`kvpack.attention.decode`'s kernel attends to the layer's quantized
  store and window directly; nothing is dequantized into memory. Left padding comes from the attention
  mask (the first valid key of each row).
- **Prefill** (longer steps) with that cache: ``scaled_dot_product_attention`` over the new tokens alone
  when the layer held nothing before and quantized none of them (they are all in the window, exact);
  otherwise over ``layer.dequantized()`` (the quantized past and the new tokens as the cache stores
  them: a temporary, freed after the layer). Prefill therefore sees the same keys and values as the
  dequantize path of the cache and as later decoding steps.
- **Any other cache** (or none): transformers' own SDPA attention, unchanged.

The mask function registered for ``"kvpack"`` is transformers' SDPA one, so masks (and the causal-mask
skip when nothing is padded) are as with ``attn_implementation="sdpa"``.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpack.attention import QUERY_DTYPES, fused

try:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "kvpack.hf_attention needs transformers 5.x: pip install 'kvpack[hf]' "
        "(or pip install 'transformers>=5,<6')"
    ) from err

#: Name of the attention implementation (``attn_implementation="kvpack"``).
NAME = "kvpack"
#: Most new tokens in one step that go to the decode kernel (plain and speculative decoding).
MAX_DECODE_QUERIES = 16


def first_valid(attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Each row's first visible key ``[batch]`` (int32) from a transformers mask, or None without one.

    Takes the 4-D ``[B or 1, 1, q_len, kv_len]`` mask (bool: True keeps; float: 0 keeps) and reads its
    last query row: with left padding, the keys before the first kept one are padding. No host sync.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4:
        raise ValueError(
            f"expected a 4-D attention mask [batch, 1, q_len, kv_len], got {tuple(attention_mask.shape)}"
        )
    last = attention_mask[:, 0, -1, :]
    keep = last if last.dtype == torch.bool else last == 0
    return keep.to(torch.int8).argmax(dim=-1).to(torch.int32).expand(batch).contiguous()


def kvpack_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query [B, Hq, Lq, D]``, ``key``/``value``
    ``[B, H, Lk, D]`` (the new tokens only, tagged ``_kvpack_layer``, in the cache's fused mode),
    returns ``(attn_output [B, Lq, Hq, D], None)``. See the module doc for what runs when."""
    layer = getattr(key, "_kvpack_layer", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    plain = (
        query.shape[2] <= MAX_DECODE_QUERIES
        and query.dtype in QUERY_DTYPES
        and not (dropout and module.training)
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
    )
    if plain:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        out = fused(query, layer, float(scale), start=first_valid(attention_mask, query.shape[0]))
        return out.transpose(1, 2).contiguous(), None
    if getattr(key, "_kvpack_past", 0) or layer.num_quantized:
        key, value = layer.dequantized()
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def enable() -> None:
    """Register ``"kvpack"`` with transformers' attention and attention-mask registries (idempotent;
    done when this module is imported)."""
    AttentionInterface.register(NAME, kvpack_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


enable()
