"""The quantized KV cache of one attention layer, framework-neutral.

A :class:`QuantizedLayer` holds the keys and values of a batch, ``[batch, kv_heads, tokens, head_dim]``,
in two parts that together cover the sequence in time order:

- the quantized store: whole blocks of ``group`` tokens, each quantized once (with
  :func:`kvpack.quantize`) when it leaves the window, and never again;
- the residual window: the most recent tokens, in the model's dtype, exact.

After every append, WHILE ``num_window > residual and num_window >= group``, the oldest ``group``
window tokens move to the quantized store. The prompt is therefore quantized in whole groups at
prefill and the remainder stays in the window; during decoding a block is quantized every ``group``
tokens. The number of quantized tokens depends only on the sequence length (:func:`quantized_length`).

Storage (all on the device of the first tensors appended; ``capT`` the allocated token capacity):

- ``key_codes [B, H, capT, ceil(D / per_byte)]``, valid rows ``[:, :, :num_quantized]``;
- ``key_scale`` / ``key_zero`` ``[B, H, rows, sD]``: the ``scale`` (``zero``) of every quantized block
  concatenated along dim 2. Per-channel formats use token groups equal to the block (one row per
  block, ``sD = D``); per-token formats have one row per token (``sD = ceil(D / channel_group)``).
  ``key_zero`` is None for the symmetric formats (int8, fp8);
- ``value_codes``, ``value_scale``, ``value_zero``: the same for the values;
- ``window_keys``, ``window_values`` ``[B, H, capW, D]``, valid ``[:, :, :num_window]``.

The quantized store is sized exactly by the first append (the prompt) or by :meth:`reserve`, and
grows by a factor of 1.5 when decoding runs past it (amortized O(1) per token; the whole cache is
never concatenated per step). The window never holds more than ``max(residual, group - 1)`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from kvpack.backends import Backend
from kvpack.ops import check_input, dequantize, quantize
from kvpack.schemes import QuantizedTensor, Scheme, parse

#: Tokens per quantized block when neither the key format nor the caller names one.
DEFAULT_GROUP = 64
#: Capacity growth factor of the quantized store once the reserved size is exceeded.
GROWTH = 1.5

#: Named (key format, value format) pairs: keys per-channel in 64-token blocks, values per-token.
CACHE_PRESETS: dict[str, tuple[str, str]] = {
    "int8": ("int8-channel-g64", "int8-token"),
    "int4": ("int4-channel-g64", "int4-token"),
    "int2": ("int2-channel-g64", "int2-token-g32"),
    "fp8": ("fp8-e4m3-channel-g64", "fp8-e4m3"),
}


def cache_formats(spec: str) -> tuple[Scheme, Scheme]:
    """Key and value schemes from a preset name (``"int4"``) or a ``"KEYFMT/VALUEFMT"`` pair
    (``"int8-channel-g64/int8-token"``); a single format name is used for both.

    >>> cache_formats("int8")
    (Scheme(bits=8, axis='channel', group=64, fp8=None), Scheme(bits=8, axis='token', group=None, fp8=None))
    """
    spec = spec.strip()
    if spec.lower() in CACHE_PRESETS:
        key, value = CACHE_PRESETS[spec.lower()]
    elif "/" in spec:
        key, _, value = spec.partition("/")
    else:
        key = value = spec
    try:
        return parse(key), parse(value)
    except ValueError as err:
        raise ValueError(
            f"cache format {spec!r}: {err}; or use a preset among {', '.join(CACHE_PRESETS)}"
        ) from None


def quantized_length(length: int, residual: int, group: int) -> int:
    """How many of ``length`` tokens sit in the quantized store (the rest are in the window).

    The flush rule quantizes greedily, so the split depends on the length only, not on how the tokens
    were appended: ``group * ceil((length - residual) / group)`` when ``residual >= group - 1``,
    ``group * floor(length / group)`` otherwise.
    """
    if residual >= group - 1:
        return group * max(math.ceil((length - residual) / group), 0)
    return group * (length // group)


def block_scheme(fmt: str | Scheme, group: int, role: str) -> Scheme:
    """The scheme one quantized block of ``group`` tokens is stored in.

    A per-channel format reduces over tokens, so its token group must be the block: a format without
    ``-gN`` gets ``group``, and a different ``-gN`` is an error. Per-token formats are kept as they are.
    """
    scheme = parse(fmt)
    if scheme.axis == "token":
        return scheme
    if scheme.group is None:
        return Scheme(bits=scheme.bits, axis="channel", group=group, fp8=scheme.fp8)
    if scheme.group != group:
        raise ValueError(
            f"{role} format {scheme.name} shares its scales over {scheme.group} tokens, but the cache "
            f"quantizes blocks of {group} tokens; use group={scheme.group} or a {role} format ending "
            f"in -g{group}"
        )
    return scheme


def check_head_dim(scheme: Scheme, head_dim: int, role: str) -> None:
    """A per-token format's channel group must divide the head dimension."""
    if scheme.axis == "token" and scheme.group is not None and head_dim % scheme.group:
        divisors = [g for g in (8, 16, 32, 64, 128) if head_dim % g == 0]
        raise ValueError(
            f"{role} format {scheme.name} groups {scheme.group} channels, which does not divide the head "
            f"dimension {head_dim}; use a channel group among {divisors} or no group"
        )


def _grown(buf: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
           used: int, capacity: int) -> torch.Tensor:
    """``buf`` with room for ``capacity`` rows along dim 2, its first ``used`` rows kept."""
    out = torch.empty(*shape[:2], capacity, *shape[3:], dtype=dtype, device=device)
    if buf is not None and used:
        out[:, :, :used].copy_(buf[:, :, :used])
    return out


class QuantizedLayer:
    """One layer's keys and values: a quantized store of whole token blocks plus a full-precision window.

    Args:
        key_format: format of the keys (a name such as ``"int8-channel-g64"`` or a Scheme).
        value_format: format of the values (e.g. ``"int8-token"``).
        residual: the most tokens kept in full precision before a block is quantized.
        group: tokens per quantized block; defaults to the key format's token group (e.g. 64 for
            ``int8-channel-g64``), or 64 for a per-token key format. A per-channel key format without
            ``-gN`` needs it.
        backend: the kvpack backend that quantizes and dequantizes (``"auto"``).

    >>> layer = QuantizedLayer("int8-channel-g64", "int8-token", residual=128)
    >>> layer.append(torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64))
    >>> layer.num_quantized, layer.num_window
    (192, 108)
    >>> k, v = layer.dequantized()          # [1, 2, 300, 64] each
    """

    def __init__(
        self,
        key_format: str | Scheme,
        value_format: str | Scheme,
        residual: int = 128,
        group: int | None = None,
        backend: Backend | str = "auto",
    ) -> None:
        key = parse(key_format)
        value = parse(value_format)
        if group is None:
            if key.axis == "channel" and key.group is None:
                raise ValueError(
                    f"key format {key.name} has no token group; name one (e.g. {key.name}-g64) or pass group="
                )
            group = key.group if key.axis == "channel" else DEFAULT_GROUP
        if not isinstance(group, int) or isinstance(group, bool) or group < 1:
            raise ValueError(f"group must be a positive number of tokens, got {group!r}")
        if not isinstance(residual, int) or isinstance(residual, bool) or residual < 0:
            raise ValueError(f"residual must be a non-negative number of tokens, got {residual!r}")
        self.key_scheme = block_scheme(key, group, "key")
        self.value_scheme = block_scheme(value, group, "value")
        self.group = group
        self.residual = residual
        self.backend = Backend(backend)
        self._reserved = 0
        self.reset()

    def reset(self) -> None:
        """Drop every token and free the storage."""
        self.key_codes: torch.Tensor | None = None
        self.key_scale: torch.Tensor | None = None
        self.key_zero: torch.Tensor | None = None
        self.value_codes: torch.Tensor | None = None
        self.value_scale: torch.Tensor | None = None
        self.value_zero: torch.Tensor | None = None
        self.window_keys: torch.Tensor | None = None
        self.window_values: torch.Tensor | None = None
        self.num_quantized = 0
        self.num_window = 0

    # ----------------------------------------------------------------------------------- properties

    @property
    def seq_length(self) -> int:
        """Tokens held: quantized plus window."""
        return self.num_quantized + self.num_window

    @property
    def window_capacity(self) -> int:
        """The most tokens the window holds between appends."""
        return max(self.residual, self.group - 1)

    @property
    def device(self) -> torch.device | None:
        return None if self.window_keys is None else self.window_keys.device

    @property
    def dtype(self) -> torch.dtype | None:
        """The model dtype (that of the window and of :meth:`dequantized`)."""
        return None if self.window_keys is None else self.window_keys.dtype

    def _held(self) -> list[torch.Tensor]:
        parts = (self.key_codes, self.key_scale, self.key_zero, self.value_codes, self.value_scale,
                 self.value_zero, self.window_keys, self.window_values)
        return [p for p in parts if p is not None]

    @property
    def nbytes(self) -> int:
        """Bytes allocated by every tensor the layer holds (capacity included, not only valid rows)."""
        return sum(p.untyped_storage().nbytes() for p in self._held())

    @property
    def fp16_nbytes(self) -> int:
        """Bytes a float16 cache of the same tokens would hold (keys and values, no spare capacity)."""
        if self.window_keys is None:
            return 0
        b, h, _, dk = self.window_keys.shape
        dv = self.window_values.shape[-1]
        return 2 * b * h * self.seq_length * (dk + dv)

    # ------------------------------------------------------------------------------------- storage

    def _rows(self, scheme: Scheme, tokens: int) -> int:
        """Scale rows for ``tokens`` quantized tokens (a multiple of the group)."""
        return tokens // self.group if scheme.axis == "channel" else tokens

    def _ensure_store(self, tokens: int) -> None:
        """Room in the quantized store for ``tokens`` tokens (a multiple of the group): the first
        allocation is exact (or the reserved size), later ones grow the capacity by :data:`GROWTH`."""
        cap = 0 if self.key_codes is None else self.key_codes.shape[2]
        if tokens <= cap:
            return
        if cap:
            tokens = max(tokens, self.group * math.ceil(cap * GROWTH / self.group))
        else:
            tokens = max(tokens, quantized_length(self._reserved, self.residual, self.group))
        self._resize_store(tokens)

    def _resize_store(self, tokens: int) -> None:
        b, h, _, dk = self.window_keys.shape
        dv = self.window_values.shape[-1]
        dev, n = self.device, self.num_quantized
        for role, scheme, d in (("key", self.key_scheme, dk), ("value", self.value_scheme, dv)):
            _, cd = scheme.code_shape(self.group, d)
            _, sd = scheme.scale_shape(self.group, d)
            codes = getattr(self, f"{role}_codes")
            setattr(self, f"{role}_codes", _grown(codes, (b, h, 0, cd), scheme.code_dtype, dev, n, tokens))
            rows_used, rows_cap = self._rows(scheme, n), self._rows(scheme, tokens)
            for part in ("scale",) if scheme.symmetric else ("scale", "zero"):
                old = getattr(self, f"{role}_{part}")
                new = _grown(old, (b, h, 0, sd), scheme.scale_dtype, dev, rows_used, rows_cap)
                setattr(self, f"{role}_{part}", new)

    def reserve(self, length: int) -> None:
        """Size the quantized store for a sequence of ``length`` tokens, exactly, so that appending up to
        that length never grows (or over-allocates) it. On an empty layer it takes effect at the first
        block stored."""
        self._reserved = max(self._reserved, length)
        tokens = quantized_length(length, self.residual, self.group)
        if self.key_codes is not None and tokens > self.key_codes.shape[2]:
            self._resize_store(tokens)

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, total: int) -> None:
        """The window, sized for what stays in it after the first append (it doubles up to its cap)."""
        b, h, _, dk = keys.shape
        dv = values.shape[-1]
        check_head_dim(self.key_scheme, dk, "key")
        check_head_dim(self.value_scheme, dv, "value")
        cap = total - quantized_length(total, self.residual, self.group)
        self.window_keys = torch.empty(b, h, cap, dk, dtype=keys.dtype, device=keys.device)
        self.window_values = torch.empty(b, h, cap, dv, dtype=values.dtype, device=values.device)

    def _check(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        for what, x in (("keys", keys), ("values", values)):
            check_input(x, what)
            if x.dim() != 4:
                raise ValueError(
                    f"{what} must be [batch, kv_heads, tokens, head_dim], got shape {tuple(x.shape)}"
                )
        if keys.shape[:3] != values.shape[:3] or keys.dtype != values.dtype or keys.device != values.device:
            raise ValueError(
                f"keys {tuple(keys.shape)} {keys.dtype} on {keys.device} and values {tuple(values.shape)} "
                f"{values.dtype} on {values.device} must agree in batch, heads, tokens, dtype and device"
            )
        if self.window_keys is None:
            return
        want = (self.window_keys.shape[:2], self.window_keys.shape[3], self.window_values.shape[3])
        got = (keys.shape[:2], keys.shape[3], values.shape[3])
        if want != got or keys.dtype != self.dtype or keys.device != self.device:
            raise ValueError(
                f"this layer holds batch x heads {tuple(want[0])}, head dims {want[1]}/{want[2]}, "
                f"{self.dtype} on {self.device}; got {tuple(got[0])}, {got[1]}/{got[2]}, "
                f"{keys.dtype} on {keys.device}"
            )

    def _ensure_window(self, tokens: int) -> None:
        cap = self.window_keys.shape[2]
        if tokens <= cap:
            return
        cap = min(self.window_capacity, max(tokens, 2 * cap))
        for name in ("window_keys", "window_values"):
            old = getattr(self, name)
            setattr(self, name, _grown(old, tuple(old.shape), old.dtype, old.device, self.num_window, cap))

    # -------------------------------------------------------------------------------------- append

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add ``keys`` and ``values`` ``[B, H, n, D]`` (float32/16/bf16, n >= 1) after the held tokens,
        then move whole blocks from the window to the quantized store as the flush rule says."""
        self._check(keys, values)
        n = keys.shape[2]
        if self.window_keys is None:
            self._allocate(keys, values, n)
        old = self.num_window
        flush = quantized_length(self.seq_length + n, self.residual, self.group) - self.num_quantized
        # The oldest `flush` tokens of (window, new tokens) go to the store, the rest become the window.
        taken = min(flush, old)
        skip = flush - taken
        if flush:
            self._store(torch.cat([self.window_keys[:, :, :taken], keys[:, :, :skip]], dim=2),
                        torch.cat([self.window_values[:, :, :taken], values[:, :, :skip]], dim=2))
        kept = old - taken
        if kept and taken:
            self.window_keys[:, :, :kept] = self.window_keys[:, :, taken:old].clone()
            self.window_values[:, :, :kept] = self.window_values[:, :, taken:old].clone()
        self._ensure_window(kept + n - skip)
        self.window_keys[:, :, kept : kept + n - skip] = keys[:, :, skip:]
        self.window_values[:, :, kept : kept + n - skip] = values[:, :, skip:]
        self.num_window = kept + n - skip

    def _store(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantize whole blocks ``[B, H, k * group, D]`` and append them to the quantized store."""
        tokens = keys.shape[2]
        self._ensure_store(self.num_quantized + tokens)
        n = self.num_quantized
        for role, scheme, x in (("key", self.key_scheme, keys), ("value", self.value_scheme, values)):
            q = quantize(x.contiguous(), scheme, self.backend)
            r0, r1 = self._rows(scheme, n), self._rows(scheme, n + tokens)
            getattr(self, f"{role}_codes")[:, :, n : n + tokens] = q.codes
            getattr(self, f"{role}_scale")[:, :, r0:r1] = q.scale
            if q.zero is not None:
                getattr(self, f"{role}_zero")[:, :, r0:r1] = q.zero
        self.num_quantized = n + tokens

    # ------------------------------------------------------------------------------------ reading

    def quantized(self) -> tuple[QuantizedTensor | None, QuantizedTensor | None]:
        """The valid quantized store as QuantizedTensors (views, no copy), keys and values; ``(None, None)``
        while nothing is quantized."""
        if not self.num_quantized:
            return None, None
        n = self.num_quantized
        out = []
        for role, scheme, win in (("key", self.key_scheme, self.window_keys),
                                  ("value", self.value_scheme, self.window_values)):
            rows = self._rows(scheme, n)
            zero = getattr(self, f"{role}_zero")
            out.append(QuantizedTensor(
                codes=getattr(self, f"{role}_codes")[:, :, :n],
                scale=getattr(self, f"{role}_scale")[:, :, :rows],
                zero=None if zero is None else zero[:, :, :rows],
                scheme=scheme,
                shape=torch.Size((*win.shape[:2], n, win.shape[3])),
                dtype=win.dtype,
            ))
        return out[0], out[1]

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[B, H, seq_length, D]`` in the model dtype: the dequantized store followed by
        the window. A temporary: the layer keeps no reference to it."""
        if self.window_keys is None:
            raise RuntimeError("the layer is empty: append keys and values first")
        wk = self.window_keys[:, :, : self.num_window]
        wv = self.window_values[:, :, : self.num_window]
        qk, qv = self.quantized()
        if qk is None:
            return wk, wv
        k = dequantize(qk, self.backend)
        v = dequantize(qv, self.backend)
        return torch.cat([k, wk], dim=2), torch.cat([v, wv], dim=2)

    # ----------------------------------------------------------------------------- batch operations

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name in ("key_codes", "key_scale", "key_zero", "value_codes", "value_scale", "value_zero",
                     "window_keys", "window_values"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))

    def index_select(self, indices: torch.Tensor) -> None:
        """Keep the batch rows ``indices`` (in that order): beam reordering and batch selection."""
        if self.window_keys is None:
            return
        indices = torch.as_tensor(indices, device=self.device)
        self._map(lambda t: t.index_select(0, indices))

    def repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times (beam-search expansion)."""
        if self.window_keys is not None:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def crop(self, length: int) -> None:
        """Keep the first ``length`` tokens (a negative ``length`` drops that many from the end).

        Cutting inside the quantized store moves the kept tokens of the cut block back into the window
        as their dequantized values, so attention over the kept tokens is unchanged.
        """
        if length < 0:
            length = self.seq_length + length
        if self.window_keys is None or length >= self.seq_length:
            return
        length = max(length, 0)
        if length >= self.num_quantized:
            self.num_window = length - self.num_quantized
            return
        blocks = length // self.group * self.group
        tail = length - blocks
        if tail:
            k, v = self.dequantized()
            self._ensure_window(tail)
            self.window_keys[:, :, :tail] = k[:, :, blocks:length]
            self.window_values[:, :, :tail] = v[:, :, blocks:length]
        self.num_quantized = blocks
        self.num_window = tail

    def __repr__(self) -> str:
        return (
            f"QuantizedLayer(keys={self.key_scheme.name}, values={self.value_scheme.name}, "
            f"group={self.group}, residual={self.residual}, quantized={self.num_quantized}, "
            f"window={self.num_window}, nbytes={self.nbytes})"
        )
