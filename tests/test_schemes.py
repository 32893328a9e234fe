"""Format names, Scheme properties, shapes and byte counts."""

from __future__ import annotations

import pytest
import torch

import kvpack
from kvpack.schemes import PRESETS, Scheme, parse


@pytest.mark.parametrize("fmt", PRESETS)
def test_presets_parse_and_round_trip(fmt: str) -> None:
    scheme = parse(fmt)
    assert scheme.name == fmt or fmt.startswith("fp8") and scheme.name == f"{fmt}-token"
    assert parse(scheme.name) == scheme
    assert parse(scheme) is scheme


@pytest.mark.parametrize(
    ("name", "want"),
    [
        ("int8-channel", Scheme(8, "channel")),
        ("int8-token-g32", Scheme(8, "token", 32)),
        ("int4-channel-g64", Scheme(4, "channel", 64)),
        ("INT2-Token-G3", Scheme(2, "token", 3)),
        ("  int4-token ", Scheme(4, "token")),
        ("fp8-e4m3", Scheme(8, "token", fp8="e4m3")),
        ("fp8-e5m2-channel-g16", Scheme(8, "channel", 16, "e5m2")),
    ],
)
def test_parse_fields(name: str, want: Scheme) -> None:
    assert parse(name) == want


@pytest.mark.parametrize(
    ("fmt", "symmetric", "qmax", "per_byte", "code_dtype", "scale_dtype"),
    [
        ("int8-channel", True, 127.0, 1, torch.int8, torch.float32),
        ("int4-token", False, 15.0, 2, torch.uint8, torch.float16),
        ("int2-channel", False, 3.0, 4, torch.uint8, torch.float16),
        ("fp8-e4m3", True, 448.0, 1, torch.float8_e4m3fn, torch.float32),
        ("fp8-e5m2", True, 57344.0, 1, torch.float8_e5m2, torch.float32),
    ],
)
def test_scheme_properties(
    fmt: str, symmetric: bool, qmax: float, per_byte: int, code_dtype: torch.dtype, scale_dtype: torch.dtype
) -> None:
    s = parse(fmt)
    assert (s.symmetric, s.qmax, s.per_byte, s.code_dtype, s.scale_dtype) == (
        symmetric,
        qmax,
        per_byte,
        code_dtype,
        scale_dtype,
    )


@pytest.mark.parametrize(
    ("fmt", "match"),
    [
        ("int8", "needs an axis"),
        ("int4", "needs an axis"),
        ("int8-channel-g0", "positive"),
        ("int3-channel", "unknown format"),
        ("int8-row", "unknown format"),
        ("fp8-e3m4", "unknown format"),
        ("fp16", "unknown format"),
        ("", "unknown format"),
        ("int8-channel-g", "unknown format"),
        ("int8-channel-g-4", "unknown format"),
    ],
)
def test_parse_rejects_bad_names(fmt: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse(fmt)


def test_parse_error_lists_the_accepted_names() -> None:
    with pytest.raises(ValueError) as info:
        parse("int9-channel")
    msg = str(info.value)
    assert "'int9-channel'" in msg and "int8-channel" in msg and "fp8-e4m3" in msg


def test_parse_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="str or Scheme"):
        parse(8)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bits": 3, "axis": "channel"},
        {"bits": 8, "axis": "row"},
        {"bits": 8, "axis": "token", "group": 0},
        {"bits": 8, "axis": "token", "group": -2},
        {"bits": 4, "axis": "token", "fp8": "e4m3"},
        {"bits": 8, "axis": "token", "fp8": "e2m1"},
    ],
)
def test_scheme_rejects_bad_fields(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Scheme(**kwargs)


@pytest.mark.parametrize(
    ("fmt", "t", "d", "group", "scale_shape", "code_shape"),
    [
        ("int8-channel", 100, 64, 100, (1, 64), (100, 64)),
        ("int8-channel-g64", 100, 64, 64, (2, 64), (100, 64)),
        ("int8-channel-g64", 10, 64, 10, (1, 64), (10, 64)),
        ("int8-token", 100, 65, 65, (100, 1), (100, 65)),
        ("int8-token-g32", 100, 65, 32, (100, 3), (100, 65)),
        ("int4-token-g32", 7, 65, 32, (7, 3), (7, 33)),
        ("int2-channel-g3", 7, 65, 3, (3, 65), (7, 17)),
        ("int2-token", 1, 1, 1, (1, 1), (1, 1)),
    ],
)
def test_shapes(
    fmt: str, t: int, d: int, group: int, scale_shape: tuple[int, int], code_shape: tuple[int, int]
) -> None:
    s = parse(fmt)
    assert s.group_size(t, d) == group
    assert s.scale_shape(t, d) == scale_shape
    assert s.code_shape(t, d) == code_shape


# Byte counts worked out by hand: codes + scales (+ zero points for int4/int2).
HAND_BYTES = [
    # 2 x 3 slices of 10 x 65: 65 int8 codes a token, one float32 scale per channel
    ("int8-channel", (2, 3, 10, 65), 6 * (10 * 65 + 65 * 4)),
    # 10 tokens in groups of 4 -> 3 scale rows
    ("int8-channel-g4", (2, 3, 10, 65), 6 * (10 * 65 + 3 * 65 * 4)),
    # one float32 scale per token
    ("int8-token", (5, 65), 5 * 65 + 5 * 4),
    # ceil(65 / 32) = 3 groups a token
    ("int8-token-g32", (4, 7, 65), 4 * (7 * 65 + 7 * 3 * 4)),
    # 33 bytes of codes a token; fp16 scale and zero per token and group of 32 channels
    ("int4-token-g32", (2, 3, 10, 65), 6 * (10 * 33 + 10 * 3 * 2 * 2)),
    # 17 bytes of codes a token; fp16 scale and zero per channel
    ("int2-channel", (7, 65), 7 * 17 + 65 * 2 * 2),
    ("int2-channel-g64", (1, 130, 3), 130 * 1 + 3 * 3 * 2 * 2),
    # one byte per fp8 code, one float32 scale per token
    ("fp8-e4m3", (2, 9, 5), 2 * (9 * 5 + 9 * 4)),
    ("fp8-e5m2-channel", (2, 9, 5), 2 * (9 * 5 + 5 * 4)),
]


@pytest.mark.parametrize(("fmt", "shape", "want"), HAND_BYTES)
def test_nbytes_by_hand(fmt: str, shape: tuple[int, ...], want: int) -> None:
    assert parse(fmt).nbytes(shape) == want
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(shape)))
    q = kvpack.quantize(x, fmt)
    assert q.nbytes == want
    held = [t.untyped_storage().nbytes() for t in (q.codes, q.scale, q.zero) if t is not None]
    assert sum(held) == want  # no hidden padding or larger buffers behind the views


def test_paper_size_needs_no_allocation() -> None:
    """The paper's largest configuration, 131072 x 8192: one byte a code plus a float32 scale a channel."""
    t, d = 131072, 8192
    assert parse("int8-channel").nbytes((t, d)) == t * d + 4 * d
    assert parse("int4-token-g32").nbytes((8, t, d)) == 8 * (t * d // 2 + t * (d // 32) * 4)


def test_quantized_tensor_repr_and_device() -> None:
    q = kvpack.quantize(torch.randn(2, 4, 8), "int4-token")
    assert q.device == torch.device("cpu")
    r = repr(q)
    assert "int4-token" in r and "(2, 4, 8)" in r and f"nbytes={q.nbytes}" in r
