"""kvpack: quantized KV caches for large language models.

>>> import kvpack, torch
>>> k = torch.rand(4096, 128) * 2 - 1
>>> q = kvpack.quantize(k, "int8-channel")
>>> k_hat = kvpack.dequantize(q)
"""

from kvpack import metrics
from kvpack.backends import Backend
from kvpack.ops import dequantize, quantize, roundtrip
from kvpack.schemes import PRESETS, QuantizedTensor, Scheme, parse

__version__ = "0.1.0"

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
