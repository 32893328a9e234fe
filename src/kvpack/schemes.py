"""What a quantization format is, and the names users write for them.

A format name reads ``<type>-<axis>[-g<N>]``:

- ``type``: ``int8`` (symmetric, codes in [-127, 127]), ``int4`` / ``int2`` (asymmetric: a scale and
  a zero point from min and max, codes in [0, 2^b - 1], packed two or four to a byte), or
  ``fp8-e4m3`` / ``fp8-e5m2`` (symmetric, the max mapped to the format's largest value).
- ``axis``: ``channel`` (one scale per channel, i.e. per head dimension, shared by the tokens) or
  ``token`` (one scale per token vector). FP8 defaults to ``token``; the integer types need it named.
- ``-gN``: groups of N along the axis the scale is shared over. ``int8-channel-g64`` gives each block
  of 64 consecutive tokens its own per-channel scales; ``int8-token-g32`` gives each block of 32
  channels of a token its own scale (llama.cpp's q8_0 layout).

The tensor layout is ``[..., tokens, channels]``: the last axis is the channel (head dimension), the
second to last the token axis, and every leading index (batch, head) has its own scales.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

import torch

Axis = Literal["channel", "token"]

#: Largest finite value of each FP8 format (OCP FP8 spec: E4M3 without infinities, E5M2 IEEE-like).
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_NAME = re.compile(r"^(?:(int)(8|4|2)|fp8-(e4m3|e5m2))(?:-(channel|token))?(?:-g(\d+))?$")


@dataclass(frozen=True)
class Scheme:
    """A quantization format.

    Attributes:
        bits: bits per code (8, 4 or 2).
        axis: ``"channel"``: scales per channel, reduced over tokens; ``"token"``: per token, reduced
            over channels.
        group: size of the groups the scales are reduced over (tokens for ``channel``, channels for
            ``token``); ``None`` means the whole axis.
        fp8: ``"e4m3"`` or ``"e5m2"`` for floating-point codes, ``None`` for integer codes.
    """

    bits: int
    axis: Axis
    group: int | None = None
    fp8: str | None = None

    def __post_init__(self) -> None:
        if self.fp8 is not None and (self.fp8 not in FP8_MAX or self.bits != 8):
            raise ValueError(f"fp8 must be 'e4m3' or 'e5m2' with bits=8, got {self.fp8!r}, bits={self.bits}")
        if self.fp8 is None and self.bits not in (8, 4, 2):
            raise ValueError(f"integer formats have 8, 4 or 2 bits, got {self.bits}")
        if self.axis not in ("channel", "token"):
            raise ValueError(f"axis must be 'channel' or 'token', got {self.axis!r}")
        if self.group is not None and self.group < 1:
            raise ValueError(f"group size must be a positive integer, got {self.group}")

    @property
    def name(self) -> str:
        head = f"fp8-{self.fp8}" if self.fp8 else f"int{self.bits}"
        tail = f"-g{self.group}" if self.group else ""
        return f"{head}-{self.axis}{tail}"

    @property
    def symmetric(self) -> bool:
        """int8 and fp8 are symmetric (scale only); int4 and int2 are asymmetric (scale and zero point)."""
        return self.fp8 is not None or self.bits == 8

    @property
    def qmax(self) -> float:
        """Largest code magnitude: 127 for int8, 2^b - 1 for the asymmetric types, the FP8 max."""
        if self.fp8 is not None:
            return FP8_MAX[self.fp8]
        return 127.0 if self.bits == 8 else float(2**self.bits - 1)

    @property
    def per_byte(self) -> int:
        """Codes packed into one byte (along the channel axis)."""
        return 8 // self.bits

    @property
    def code_dtype(self) -> torch.dtype:
        if self.fp8 is not None:
            return FP8_DTYPES[self.fp8]
        return torch.int8 if self.bits == 8 else torch.uint8

    @property
    def scale_dtype(self) -> torch.dtype:
        """float32 for int8 and fp8 (the paper's layout); float16 for int4/int2 (as KIVI and llama.cpp
        store them), so that metadata stays small beside half-byte codes."""
        return torch.float32 if self.bits == 8 else torch.float16

    def group_size(self, tokens: int, channels: int) -> int:
        """The number of elements one scale covers along the reduced axis, for a given shape."""
        full = tokens if self.axis == "channel" else channels
        return min(self.group, full) if self.group else full

    def scale_shape(self, tokens: int, channels: int) -> tuple[int, int]:
        """Shape of the scales (and zero points) for a ``[tokens, channels]`` slice."""
        g = max(self.group_size(tokens, channels), 1)
        if self.axis == "channel":
            return (math.ceil(tokens / g), channels)
        return (tokens, math.ceil(channels / g))

    def code_shape(self, tokens: int, channels: int) -> tuple[int, int]:
        """Shape of the codes for a ``[tokens, channels]`` slice (packed along the channel axis)."""
        return (tokens, math.ceil(channels / self.per_byte))

    def nbytes(self, shape: tuple[int, ...] | torch.Size) -> int:
        """Bytes held by the codes, scales and zero points of a tensor of this shape."""
        *lead, tokens, channels = shape
        n = math.prod(lead)
        ct, cd = self.code_shape(tokens, channels)
        st, sd = self.scale_shape(tokens, channels)
        meta = (1 if self.symmetric else 2) * st * sd * self.scale_dtype.itemsize
        return n * (ct * cd + meta)

    def __str__(self) -> str:
        return self.name


#: Named formats shown by ``kvpack accuracy`` and the docs; any name the grammar accepts also works.
PRESETS: tuple[str, ...] = (
    "int8-channel",
    "int8-token",
    "int8-channel-g64",
    "int8-token-g32",
    "int4-channel",
    "int4-token",
    "int4-channel-g64",
    "int4-token-g32",
    "int2-channel-g64",
    "int2-token-g32",
    "fp8-e4m3",
    "fp8-e5m2",
    "fp8-e4m3-channel",
)


def parse(fmt: str | Scheme) -> Scheme:
    """Turn a format name (``"int8-channel"``, ``"int4-token-g32"``, ``"fp8-e4m3"``) into a Scheme.

    >>> parse("int8-channel-g64")
    Scheme(bits=8, axis='channel', group=64, fp8=None)
    """
    if isinstance(fmt, Scheme):
        return fmt
    if not isinstance(fmt, str):
        raise TypeError(f"format must be a str or Scheme, got {type(fmt).__name__}")
    m = _NAME.match(fmt.strip().lower())
    if m is None:
        raise ValueError(
            f"unknown format {fmt!r}: expected <type>-<axis>[-g<N>] with type int8, int4, int2, "
            f"fp8-e4m3 or fp8-e5m2 and axis channel or token, e.g. {', '.join(PRESETS[:6])}"
        )
    _, bits, fp8, axis, group = m.groups()
    if fp8 is None and axis is None:
        raise ValueError(f"format {fmt!r} needs an axis: {fmt}-channel or {fmt}-token")
    return Scheme(
        bits=8 if fp8 else int(bits),
        axis=axis or "token",
        group=int(group) if group else None,
        fp8=fp8,
    )


@dataclass
class QuantizedTensor:
    """A quantized tensor: codes plus the scales (and zero points) to rebuild it.

    Attributes:
        codes: ``[..., T, ceil(D / per_byte)]``: int8 (int8 formats), uint8 with 2 or 4 codes a byte
            (int4/int2, first code in the low bits), or float8 (fp8 formats).
        scale: ``[..., sT, sD]`` (see :meth:`Scheme.scale_shape`), float32 or float16.
        zero: like ``scale`` for the asymmetric formats (the group minimum), else ``None``.
        scheme: the format.
        shape: the original tensor's shape; ``dtype``: its dtype.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    scheme: Scheme
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes really held: codes + scales + zero points."""
        parts = (self.codes, self.scale, self.zero)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def __repr__(self) -> str:
        return (
            f"QuantizedTensor({self.scheme.name}, shape={tuple(self.shape)}, dtype={self.dtype}, "
            f"nbytes={self.nbytes}, device={self.device})"
        )
