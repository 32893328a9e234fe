"""Triton kernels: quantize / dequantize for every format (``quant``) and decode attention.

The modules import triton, so they are imported only when a ``triton`` backend is used.
"""
