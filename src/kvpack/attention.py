"""Decode attention over a quantized cache layer, reading the codes directly: ``kvpack.attention.decode``.

>>> layer = QuantizedLayer("int8-channel-g64", "int8-token", residual=128)
>>> layer.append(k, v)                              # [B, H, T, D] each
>>> out = decode(q, layer)                           # q [B, Hq, Lq, D] -> [B, Hq, Lq, D]

On CUDA (or on the CPU with ``TRITON_INTERPRET=1``) this runs the flash-decoding kernel of
:mod:`kvpack.triton.attention` through the ``kvpack::decode_attention`` custom op (with a fake
implementation, so ``torch.compile`` and CUDA graphs see one opaque op and no host sync); for the
``int4`` preset on a GPU, calls large enough for it go to the CUDA C kernel of
:mod:`kvpack.cuda.decode` instead (same partials, same combine). Elsewhere it dequantizes the layer and
computes the same masked attention in float32 with plain torch.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from kvpack.backends import Backend, why_not
from kvpack.cache import QuantizedLayer
from kvpack.schemes import parse

if TYPE_CHECKING:
    from kvpack.triton.attention import KernelConfig

QUERY_DTYPES = (torch.float16, torch.bfloat16)


def _store(layer: QuantizedLayer) -> tuple[torch.Tensor | None, ...]:
    """The layer's code, scale and zero-point buffers, keys then values (whole buffers: the kernel reads
    only the first ``num_quantized`` tokens' rows)."""
    return (layer.key_codes, layer.key_scale, layer.key_zero,
            layer.value_codes, layer.value_scale, layer.value_zero)


@torch.library.custom_op("kvpack::decode_attention", mutates_args=())
def decode_attention(
    q: torch.Tensor,
    key_codes: torch.Tensor | None,
    key_scale: torch.Tensor | None,
    key_zero: torch.Tensor | None,
    value_codes: torch.Tensor | None,
    value_scale: torch.Tensor | None,
    value_zero: torch.Tensor | None,
    window_keys: torch.Tensor,
    window_values: torch.Tensor,
    num_quantized: int,
    num_window: int,
    key_format: str,
    value_format: str,
    group: int,
    scale: float,
    start: torch.Tensor | None,
    end: torch.Tensor | None,
) -> torch.Tensor:
    """The decode kernels on a layer's raw tensors (see :func:`kvpack.triton.attention.decode_attention`,
    which picks the Triton or the CUDA int4 kernel); returns a new contiguous ``[B, Hq, Lq, D]`` tensor
    in q's dtype."""
    from kvpack.triton.attention import decode_attention as launch

    return launch(q, key_codes, key_scale, key_zero, value_codes, value_scale, value_zero, window_keys,
                  window_values, num_quantized, num_window, parse(key_format), parse(value_format), group,
                  scale, start, end)


@decode_attention.register_fake
def _(q: torch.Tensor, *args: object) -> torch.Tensor:
    return q.new_empty(q.shape)


def _positions(x: torch.Tensor | None, name: str, batch: int, device: torch.device) -> torch.Tensor | None:
    if x is None:
        return None
    integer = isinstance(x, torch.Tensor) and not x.dtype.is_floating_point and x.dtype != torch.bool
    if not integer or x.shape != (batch,):
        raise ValueError(
            f"{name} must be an integer tensor of shape [{batch}] (one entry per batch row), got "
            f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
        )
    return x.to(device=device, dtype=torch.int32)


def _capturing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check(q: torch.Tensor, layer: QuantizedLayer) -> None:
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    if not isinstance(layer, QuantizedLayer):
        raise TypeError(f"layer must be a kvpack.cache.QuantizedLayer, got {type(layer).__name__}")
    if q.dtype not in QUERY_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; decode attention takes float16 or bfloat16 queries")
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_heads, q_len, head_dim], got shape {tuple(q.shape)}")
    if layer.window_keys is None:
        raise ValueError("the layer is empty: append keys and values before attending to it")
    b, hkv, _, dk = layer.window_keys.shape
    dv = layer.window_values.shape[-1]
    if dk != dv:
        raise ValueError(f"decode attention needs one head dim for keys and values, the layer has {dk}, {dv}")
    if q.shape[0] != b or q.shape[3] != dk or q.shape[1] % hkv or q.shape[1] == 0:
        raise ValueError(
            f"q {tuple(q.shape)} does not fit the layer (batch {b}, {hkv} KV heads, head dim {dk}): "
            f"q must be [{b}, a multiple of {hkv}, q_len, {dk}]"
        )
    if q.dtype != layer.dtype or q.device != layer.device:
        raise ValueError(f"q is {q.dtype} on {q.device}, the layer holds {layer.dtype} on {layer.device}")
    if not 1 <= q.shape[2] <= layer.seq_length:
        raise ValueError(f"q_len {q.shape[2]} must be between 1 and the layer's {layer.seq_length} tokens: "
                         "the queries are the layer's last q_len tokens")


def _check_positions(start: torch.Tensor | None, end: torch.Tensor | None, q_len: int, tokens: int) -> None:
    """Values of ``start``/``lengths`` (one host sync; skipped under CUDA-graph capture and torch.compile)."""
    if _capturing() or (start is None and end is None):
        return
    e = end if end is not None else torch.full_like(start, tokens)
    s = start if start is not None else torch.zeros_like(end)
    if bool(((e < q_len) | (e > tokens) | (s < 0) | (s >= e)).any()):
        raise ValueError(
            f"need {q_len} (q_len) <= lengths <= {tokens} (tokens in the layer) and 0 <= start < lengths "
            f"for every row; got start={s.tolist()}, lengths={e.tolist()}"
        )


def reference_decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    start: torch.Tensor | None = None,
    end: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain-torch twin of the kernel: masked GQA attention in float32 over full keys/values
    ``[B, H, N, D]``; row ``b`` sees tokens ``[start_b, end_b)``, query ``i`` of ``Lq`` sits at
    ``end_b - Lq + i`` (causal); a query that sees no key gets zeros. Returns q's dtype."""
    b, hq, lq, _ = q.shape
    n = keys.shape[2]
    dev = q.device
    e = torch.full((b,), n, device=dev) if end is None else end.clamp(max=n)
    s = torch.zeros(b, device=dev, dtype=torch.long) if start is None else start
    j = torch.arange(n, device=dev)[None, None, :]
    i = torch.arange(lq, device=dev)[None, :, None]
    allowed = (j >= s[:, None, None]) & (j <= e[:, None, None] - lq + i) & (j < e[:, None, None])
    rep = hq // keys.shape[1]
    k = keys.float().repeat_interleave(rep, dim=1)
    v = values.float().repeat_interleave(rep, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], -math.inf)
    p = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (p @ v).to(q.dtype)


@torch.compiler.assume_constant_result
def _without_kernel(device: torch.device) -> str | None:
    """Why the Triton kernel cannot run on ``device`` (None if it can); a constant to torch.compile."""
    return why_not(Backend.TRITON, parse("int8-token"), device)


def fused(q: torch.Tensor, layer: QuantizedLayer, scale: float, start: torch.Tensor | None = None,
          end: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode` without argument checks (for callers that already hold valid arguments, such as
    the transformers attention function): the custom op when Triton can run, else the torch twin."""
    if _without_kernel(q.device) is not None:
        keys, values = layer.dequantized()
        return reference_decode(q, keys, values, scale, start, end)
    return decode_attention(
        q, *_store(layer), layer.window_keys, layer.window_values, layer.num_quantized, layer.num_window,
        layer.key_scheme.name, layer.value_scheme.name, layer.group, scale, start, end,
    )


def decode(
    q: torch.Tensor,
    layer: QuantizedLayer,
    *,
    scale: float | None = None,
    lengths: torch.Tensor | None = None,
    start: torch.Tensor | None = None,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Attention of the newest tokens' queries over a quantized cache layer, without dequantizing it.

    Args:
        q: ``[B, Hq, Lq, D]`` float16/bfloat16 queries of the layer's last ``Lq`` tokens (1 for plain
            decoding, a few for speculative decoding), causal among themselves; ``Hq`` a multiple of the
            layer's KV heads (grouped-query attention).
        layer: a :class:`kvpack.cache.QuantizedLayer` holding ``[B, H, seq_length, D]`` keys/values in
            q's dtype, on q's device.
        scale: softmax scale, default ``1 / sqrt(D)``.
        lengths: optional integer ``[B]``: valid tokens of each row counted from the start (right
            padding); row ``b``'s queries are then its tokens ``lengths_b - Lq .. lengths_b - 1``.
        start: optional integer ``[B]``: first valid token of each row (left padding, as transformers
            pads a batch for generation).
        config: tile sizes, splits and kernel (:class:`kvpack.triton.attention.KernelConfig`), for
            tuning; bypasses the custom op.

    Returns:
        ``[B, Hq, Lq, D]`` in q's dtype: softmax(q k^T * scale) v over the keys/values the layer holds,
        equal (up to float32 summation order) to attention over ``layer.dequantized()``.

    >>> out = decode(torch.randn(1, 32, 1, 128, dtype=torch.float16, device="cuda"), layer)
    """
    _check(q, layer)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    end = _positions(lengths, "lengths", q.shape[0], q.device)
    start = _positions(start, "start", q.shape[0], q.device)
    _check_positions(start, end, q.shape[2], layer.seq_length)
    if config is None:
        return fused(q, layer, float(scale), start, end)
    reason = _without_kernel(q.device)
    if reason is not None:
        raise RuntimeError(f"a kernel config needs the Triton kernel: {reason}")
    from kvpack.triton.attention import decode_attention as launch

    return launch(q, *_store(layer), layer.window_keys, layer.window_values, layer.num_quantized,
                  layer.num_window, layer.key_scheme, layer.value_scheme, layer.group, float(scale),
                  start, end, config=config)
