"""kvpack: quantized KV caches for large language models.

>>> import kvpack, torch
>>> k = torch.rand(4096, 128) * 2 - 1
>>> q = kvpack.quantize(k, "int8-channel")
>>> k_hat = kvpack.dequantize(q)
"""

import importlib
from types import ModuleType

from kvpack import metrics
from kvpack.backends import Backend
from kvpack.ops import dequantize, quantize, roundtrip
from kvpack.schemes import PRESETS, QuantizedTensor, Scheme, parse

__version__ = "0.1.0"

_LAZY = ("attention", "cache", "hf")


def __getattr__(name: str) -> ModuleType:
    """``kvpack.attention``, ``kvpack.cache`` and ``kvpack.hf`` load on first use (``hf`` needs
    transformers)."""
    if name in _LAZY:
        return importlib.import_module(f"kvpack.{name}")
    raise AttributeError(f"module 'kvpack' has no attribute {name!r}")

__all__ = [
    "Backend",
    "PRESETS",
    "QuantizedTensor",
    "Scheme",
    "dequantize",
    "metrics",
    "parse",
    "quantize",
    "roundtrip",
]
