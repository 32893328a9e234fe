"""``kvpack bench-attention``: decode attention over a quantized KV cache, against float16 SDPA.

Kernel table, one row per (method, KV heads, batch, context), one query token, 32 query heads, head
dim 128 by default:

- ``kvpack-int8`` / ``-int4`` / ``-fp8`` / ``-int2``: :func:`kvpack.attention.decode` over a
  :class:`kvpack.cache.QuantizedLayer` of that preset (keys per-channel in 64-token blocks, values
  per-token, a 128-token full-precision window), reading codes and scales directly;
- ``kvpack-int4-triton``: where the int4 row ran the CUDA C kernel (:mod:`kvpack.cuda.decode`), the
  Triton kernel on the same cache, for comparison;
- ``sdpa-fp16``: ``scaled_dot_product_attention`` on a float16 cache, the faster of its two
  grouped-query forms (``enable_gqa=True``, or the query heads of a KV head packed as query rows, as
  transformers does for one-token steps);
- ``dequant-sdpa-int8``: what a user of transformers' QuantizedCache gets: the int8 layer dequantized
  into a float16 copy, then SDPA.

Bytes: what each method must move: the quantized layer's valid codes, scales, zero points and window
(kvpack); the float16 keys and values (SDPA); the quantized layer plus its float16 copy written and read
back (dequantize-then-SDPA). GB/s is bytes over the median time; ``of_copy`` divides it by the
device-to-device copy bandwidth measured in the same run (bytes read + written). Inputs smaller than
twice the L2 cache are rotated through several copies (:func:`kvpack.bench.harness.rotation`).

``--e2e``: a Llama-3-8B-shaped model with random float16 weights (32 layers, 32 query heads, 8 KV
heads, head dim 128): the GPU time of one decoding step at ``--e2e-context`` cached tokens and batch
``--e2e-batch``, with the kvpack int8 cache (fused attention), with the same cache through the
dequantize path, and with transformers' ``DynamicCache`` in float16; the memory each cache holds; the
largest batch each fits at that context (from free memory and bytes per sequence, then verified by
allocating it and running a step); and ``generate`` tokens per second at batch 1 and 8. The caches are
filled with random keys and values of the right shapes instead of running long prefills.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from kvpack.attention import decode
from kvpack.bench import harness
from kvpack.cache import CACHE_PRESETS, QuantizedLayer

if TYPE_CHECKING:
    from kvpack.triton.attention import KernelConfig

_DEFAULT_OUT = "kvpack-results/attention"
FORMATS = ("int8", "int4", "fp8", "int2")
RESIDUAL = 128
FILL_CHUNK_BYTES = 1 << 29  # float16 keys + values generated per append while filling a cache
_MEMORY_MARGIN = 2 << 30  # bytes left free beyond a method's estimated need
#: A kvpack output further than this (relative L2) from SDPA over the dequantized cache is an error.
REL_ERROR_LIMIT = 1e-2


@dataclass
class Row:
    """One measurement. Times in ms, bytes in bytes, rates in GB/s (10^9 B/s)."""

    method: str
    formats: str | None
    batch: int
    q_heads: int
    kv_heads: int
    head_dim: int
    context: int
    status: str = "ok"
    reason: str | None = None
    ms: float | None = None
    bytes: int | None = None
    cache_bytes: int | None = None
    gbps: float | None = None
    of_copy: float | None = None
    speedup_vs_sdpa: float | None = None
    rel_error: float | None = None
    note: str | None = None


# --------------------------------------------------------------------------------------------- options


def _ints(text: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]``; a ``k`` suffix multiplies by 1024 (``"4k"`` -> 4096)."""
    values = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        try:
            values.append(int(part.removesuffix("k")) * (1024 if part.endswith("k") else 1))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers (4k = 4096), got {text!r}"
            ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvpack bench-attention``."""
    parser.description = (
        "Decode attention over a quantized KV cache (kvpack int8/int4/fp8/int2) against float16 SDPA and "
        "dequantize-then-SDPA: median time, bytes, GB/s, fraction of copy bandwidth, speedup; with --e2e, "
        "a Llama-3-8B-shaped model's decoding step, cache memory, largest batch and generate tokens/s. "
        "Writes attention.json, attention.csv and PNG plots to --out."
    )
    parser.add_argument("--batches", type=_ints, default=[1, 8, 32], help="batch sizes (default 1,8,32)")
    parser.add_argument(
        "--contexts",
        type=_ints,
        default=[4096, 16384, 32768, 131072],
        help="cached tokens (default 4k,16k,32k,128k)",
    )
    parser.add_argument("--kv-heads", type=_ints, default=[8, 32], help="KV heads (default 8,32)")
    parser.add_argument("--q-heads", type=int, default=32, help="query heads (default 32)")
    parser.add_argument("--head-dim", type=int, default=128, help="head dimension (default 128)")
    parser.add_argument(
        "--formats",
        default=",".join(FORMATS),
        help=f"kvpack cache presets to time (default {','.join(FORMATS)})",
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions, median kept (default 10)")
    parser.add_argument(
        "--timing",
        choices=("graph", "events"),
        default="graph",
        help="GPU kernel timing: each method's calls over the input rotation captured as one CUDA graph "
        "and replayed (default: no host work between kernels, as a server decodes), or launched one by "
        "one from Python behind a GPU sleep (events)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 8, contexts 4k and 32k, 8 KV heads, int8 and int4, 5 repeats",
    )
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel table (with --e2e)")
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="also the end-to-end Llama-3-8B-shaped decoding measurement (~60 GB of GPU)",
    )
    parser.add_argument(
        "--e2e-context", type=int, default=32768, help="cached tokens for --e2e (default 32768)"
    )
    parser.add_argument("--e2e-batch", type=int, default=8, help="batch of the --e2e step timing (default 8)")
    parser.add_argument(
        "--e2e-new-tokens",
        type=int,
        default=32,
        help="tokens generate() produces in the tokens/s measurement (default 32)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda[:N]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic caches (default 0)")
    parser.add_argument("--out", default=_DEFAULT_OUT, help=f"output folder (default {_DEFAULT_OUT}/)")
    parser.add_argument("--no-plots", action="store_true", help="do not draw the PNG plots")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA GPU")
    return device


#: Presets whose tile shapes ``benchmarks/gpu_check_attention.py`` sweeps.
SWEEP_PRESETS = ("int8", "int4")


def sweep_configs(base: KernelConfig) -> list[KernelConfig]:
    """The decode-kernel configurations the tile sweep times around ``base`` (the default, first): query
    rows per program, tokens per tile, warps, software-pipeline stages, forced split counts, packed
    values accumulated by bit field (``value_fields``; the same as ``base`` for 8-bit values), and the
    16-row, 2-warp, 64-token program of earlier defaults."""
    from kvpack.triton.attention import KernelConfig

    configs = [base, KernelConfig(block_n=64, num_warps=2, block_m=16)]
    configs += [replace(base, block_m=m) for m in (8, 16) if m != base.block_m]
    configs += [replace(base, block_n=64), replace(base, num_stages=3), replace(base, num_warps=2),
                replace(base, num_warps=2, block_n=64)]
    configs += [replace(base, num_splits=s) for s in (8, 12, 16, 24, 32, 48)]
    configs += [replace(base, value_fields=True), replace(base, value_fields=True, block_n=64),
                replace(base, value_fields=True, num_warps=2, block_n=64)]
    return configs


# ---------------------------------------------------------------------------------------------- inputs


def _free(device: torch.device) -> int:
    """Bytes a new allocation can take: free device memory plus what torch's allocator holds unused."""
    if device.type != "cuda":
        return harness.available_memory(device)
    gc.collect()
    torch.cuda.empty_cache()
    unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return harness.available_memory(device) + unused


def _randn(
    shape: tuple[int, ...], device: torch.device, g: torch.Generator, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device, dtype=dtype)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def filled_layer(
    preset: str,
    batch: int,
    kv_heads: int,
    tokens: int,
    head_dim: int,
    device: torch.device,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
) -> QuantizedLayer:
    """A :class:`QuantizedLayer` of ``preset`` holding ``tokens`` random tokens, appended in chunks so that
    no full-precision copy of the whole cache ever exists."""
    layer = QuantizedLayer(*CACHE_PRESETS[preset], residual=RESIDUAL)
    layer.reserve(tokens)
    g = _generator(device, seed)
    per_token = 2 * batch * kv_heads * head_dim * dtype.itemsize
    chunk = max(layer.group, FILL_CHUNK_BYTES // per_token // layer.group * layer.group)
    done = 0
    while done < tokens:
        n = min(chunk, tokens - done)
        shape = (batch, kv_heads, n, head_dim)
        layer.append(_randn(shape, device, g, dtype), _randn(shape, device, g, dtype))
        done += n
    return layer


def layer_bytes(layer: QuantizedLayer) -> int:
    """Bytes a decode step must read from ``layer``: the valid codes, scales, zero points and window."""
    b, h, _, d = layer.window_keys.shape
    total = 2 * b * h * layer.num_window * d * layer.window_keys.element_size()
    for scheme in (layer.key_scheme, layer.value_scheme):
        total += scheme.nbytes((b, h, layer.num_quantized, d)) if layer.num_quantized else 0
    return total


def _kernel_choice(q: torch.Tensor, layer: QuantizedLayer, triton: bool) -> tuple[KernelConfig | None, str]:
    """The config a kvpack row decodes with (None: the default path) and the kernel that runs."""
    from kvpack.attention import _store
    from kvpack.triton.attention import default_config, takes_cuda_kernel

    rows = q.shape[1] // layer.window_keys.shape[1] * q.shape[2]
    config = default_config(q.shape[-1], layer.group, layer.key_scheme, layer.value_scheme, rows)
    if triton:
        return replace(config, kernel="triton"), "Triton"
    cuda = takes_cuda_kernel(q, _store(layer), layer.window_keys, layer.seq_length, layer.key_scheme,
                             layer.value_scheme, layer.group, config)
    return None, "CUDA C" if cuda else "Triton"


def sdpa_decode(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, packed: bool) -> torch.Tensor:
    """One-token SDPA with grouped-query heads: ``enable_gqa=True``, or each KV head's query heads packed
    as query rows (``q [B, Hq, 1, D]`` viewed as ``[B, H, Hq / H, D]``)."""
    b, hq, _, d = q.shape
    h = keys.shape[1]
    if hq == h:
        return F.scaled_dot_product_attention(q, keys, values)
    if packed:
        out = F.scaled_dot_product_attention(q.view(b, h, hq // h, d), keys, values)
        return out.view(b, hq, 1, d)
    return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def _rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


# -------------------------------------------------------------------------------------------- kernels


class KernelBench:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.rows: list[Row] = []
        self.copy_gbps: float | None = None

    def measure_copy(self) -> None:
        """Device-to-device copy bandwidth, bytes read + written (the ceiling the kernels are held to)."""
        n = min(1 << 30, _free(self.device) // 4)
        src = torch.empty(n, dtype=torch.uint8, device=self.device)
        dst = torch.empty_like(src)
        dst.copy_(src)
        samples, _ = harness.time_calls(dst.copy_, [(src,)], self.args.repeats, self.device)
        self.copy_gbps = 2 * n / harness.median(samples) / 1e9

    def _time(self, fn: Callable[..., Any], inputs: list[tuple]) -> float:
        if self.device.type == "cuda" and self.args.timing == "graph":
            samples, _ = harness.time_graph(fn, inputs, self.args.repeats)  # warms up itself
        else:
            fn(*inputs[0])
            harness.synchronize(self.device)
            samples, _ = harness.time_calls(fn, inputs, self.args.repeats, self.device)
        return harness.median(samples) * 1e3

    def _copies(self, op_bytes: int, need: int) -> int:
        """Input copies to rotate through, as many as the L2 rule asks and memory allows."""
        want = harness.rotation(op_bytes, self.device)
        return max(1, min(want, (_free(self.device) - _MEMORY_MARGIN) // max(need, 1)))

    def _layers(
        self, preset: str, shape: dict[str, int], moved: int = 0, held: int = 0
    ) -> list[QuantizedLayer]:
        """Filled layers of ``preset`` to rotate through (:meth:`_copies`), the first seeded alike for
        every method: a call moves the layer's bytes plus ``moved``, and holds ``held`` bytes beside it."""
        b, h, t, d = shape["batch"], shape["kv_heads"], shape["context"], shape["head_dim"]
        first = filled_layer(preset, b, h, t, d, self.device, seed=self.args.seed)
        n = self._copies(layer_bytes(first) + moved, first.nbytes + held)
        return [first] + [filled_layer(preset, b, h, t, d, self.device, seed=self.args.seed + i)
                          for i in range(1, n)]

    def case(self, kv_heads: int, batch: int, context: int) -> None:
        a, dev = self.args, self.device
        shape = dict(batch=batch, q_heads=a.q_heads, kv_heads=kv_heads, head_dim=a.head_dim, context=context)
        fp16 = 2 * batch * kv_heads * context * a.head_dim * 2
        g = _generator(dev, a.seed + 1)
        q = _randn((batch, a.q_heads, 1, a.head_dim), dev, g)

        # float16 SDPA: the baseline every speedup is measured against.
        sdpa_ms = None
        row = Row("sdpa-fp16", None, **shape)
        if fp16 + _MEMORY_MARGIN > _free(dev):
            row.status, row.reason = "skipped", f"needs {fp16 / 1e9:.1f} GB of float16 cache"
        else:
            n = self._copies(fp16, fp16)
            kv = (batch, kv_heads, context, a.head_dim)
            inputs = [(q, _randn(kv, dev, g), _randn(kv, dev, g)) for _ in range(n)]
            forms = (
                {"one query head per KV head": False}
                if kv_heads == a.q_heads
                else {"enable_gqa": False, "packed query heads": True}
            )
            times = {
                name: self._time(lambda q, k, v, p=packed: sdpa_decode(q, k, v, p), inputs)
                for name, packed in forms.items()
            }
            row.note = min(times, key=times.get)
            sdpa_ms = times[row.note]
            row.ms, row.bytes, row.cache_bytes = sdpa_ms, fp16, fp16
            del inputs
        self.rows.append(row)

        reference: dict[str, torch.Tensor] = {}
        for preset in a.formats:
            self.rows.append(self._kvpack(preset, q, shape, fp16, sdpa_ms, reference))
            if self.rows[-1].note and "CUDA C" in self.rows[-1].note:
                self.rows.append(self._kvpack(preset, q, shape, fp16, sdpa_ms, reference, triton=True))
        self.rows.append(self._dequant_sdpa(q, shape, fp16, sdpa_ms, reference))

    def _kvpack(
        self,
        preset: str,
        q: torch.Tensor,
        shape: dict[str, int],
        fp16: int,
        sdpa_ms: float | None,
        reference: dict[str, torch.Tensor],
        triton: bool = False,
    ) -> Row:
        """A kvpack row: the default path (the CUDA C kernel where it applies), or with ``triton`` the
        Triton kernel at its default tiles (``kvpack-<preset>-triton``)."""
        dev = self.device
        name = f"kvpack-{preset}" + ("-triton" if triton else "")
        row = Row(name, "/".join(CACHE_PRESETS[preset]), **shape)
        estimate = fp16 // {"int8": 2, "fp8": 2, "int4": 3, "int2": 5}[preset] + FILL_CHUNK_BYTES * 3
        if estimate + _MEMORY_MARGIN > _free(dev):
            row.status, row.reason = "skipped", f"needs about {estimate / 1e9:.1f} GB"
            return row
        layers = self._layers(preset, shape)
        first, nbytes = layers[0], layer_bytes(layers[0])
        config, kernel = _kernel_choice(q, first, triton)

        def step(layer: QuantizedLayer) -> torch.Tensor:
            return decode(q, layer, config=config)

        row.ms = self._time(step, [(layer,) for layer in layers])
        row.bytes = row.cache_bytes = nbytes
        row.note = f"{first.num_quantized} quantized + {first.num_window} window tokens, {kernel} kernel"
        if 2 * fp16 + _MEMORY_MARGIN < _free(dev):
            keys, values = first.dequantized()
            ref = sdpa_decode(q, keys, values, packed=True)
            row.rel_error = _rel_error(step(first), ref)
            if preset == "int8":
                reference["int8"] = ref
            del keys, values
        self._derive(row, sdpa_ms)
        return row

    def _dequant_sdpa(
        self,
        q: torch.Tensor,
        shape: dict[str, int],
        fp16: int,
        sdpa_ms: float | None,
        reference: dict[str, torch.Tensor],
    ) -> Row:
        dev = self.device
        row = Row("dequant-sdpa-int8", "/".join(CACHE_PRESETS["int8"]), **shape)
        need = fp16 // 2 + 2 * fp16 + FILL_CHUNK_BYTES * 3
        if need + _MEMORY_MARGIN > _free(dev):
            row.status = "skipped"
            row.reason = f"needs about {need / 1e9:.1f} GB (the cache and its float16 copy)"
            return row
        layers = self._layers("int8", shape, moved=2 * fp16, held=fp16)
        first, quantized = layers[0], layer_bytes(layers[0])

        def step(layer: QuantizedLayer) -> torch.Tensor:
            keys, values = layer.dequantized()
            return sdpa_decode(q, keys, values, packed=True)

        row.ms = self._time(step, [(layer,) for layer in layers])
        row.bytes, row.cache_bytes = quantized + 2 * fp16, quantized
        row.note = "bytes: the int8 cache, plus its float16 copy written and read back"
        if "int8" in reference:
            row.rel_error = _rel_error(step(first), reference["int8"])
        self._derive(row, sdpa_ms)
        return row

    def _derive(self, row: Row, sdpa_ms: float | None) -> None:
        if row.rel_error is not None and row.rel_error >= REL_ERROR_LIMIT:
            row.status = "error"
            row.reason = f"output differs from SDPA over the dequantized cache by {row.rel_error:.3g}"
        row.gbps = row.bytes / (row.ms / 1e3) / 1e9
        row.of_copy = row.gbps / self.copy_gbps if self.copy_gbps else None
        row.speedup_vs_sdpa = sdpa_ms / row.ms if sdpa_ms else None

    def run(self, progress: Any) -> None:
        a = self.args
        if self.device.type == "cuda":
            self.measure_copy()
        for kv_heads in a.kv_heads:
            for batch in a.batches:
                for context in a.contexts:
                    progress.set_postfix_str(f"H={kv_heads} B={batch} T={context}")
                    try:
                        self.case(kv_heads, batch, context)
                    except torch.cuda.OutOfMemoryError as err:
                        self.rows.append(
                            Row(
                                "case",
                                None,
                                batch,
                                a.q_heads,
                                kv_heads,
                                a.head_dim,
                                context,
                                status="skipped",
                                reason=f"out of memory: {str(err)[:120]}",
                            )
                        )
                    gc.collect()
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
                    progress.update(1)
        for r in self.rows:
            if r.status == "ok" and r.method == "sdpa-fp16":
                self._derive(r, r.ms)


# ------------------------------------------------------------------------------------------ end to end


def llama3_8b_shaped(device: torch.device, layers: int = 32) -> Any:
    """A Llama-3-8B-shaped ``LlamaForCausalLM`` with random float16 weights, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=131072,
        rope_theta=500000.0,
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def _fill_dynamic(model: Any, batch: int, tokens: int, seed: int) -> Any:
    from transformers import DynamicCache

    cfg = model.config
    cache = DynamicCache(config=cfg)
    g = _generator(model.device, seed)
    shape = (batch, cfg.num_key_value_heads, tokens, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        cache.update(_randn(shape, model.device, g), _randn(shape, model.device, g), i)
    return cache


def _fill_static(model: Any, batch: int, tokens: int, seed: int, extra: int) -> Any:
    """transformers' StaticCache (preallocated, no concatenation per step) holding ``tokens`` random
    tokens, room for ``extra`` more."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=tokens + extra)
    g = _generator(model.device, seed)
    shape = (batch, cfg.num_key_value_heads, tokens, cfg.head_dim)
    position = {"cache_position": torch.arange(tokens, device=model.device)}
    for i in range(cfg.num_hidden_layers):
        cache.update(_randn(shape, model.device, g), _randn(shape, model.device, g), i, position)
    return cache


def _fill_kvpack(model: Any, batch: int, tokens: int, seed: int, attention: str, extra: int) -> Any:
    from kvpack.hf import QuantizedKVCache

    cfg = model.config
    cache = QuantizedKVCache(
        cfg, preset="int8", residual=RESIDUAL, attention=attention, max_length=tokens + extra
    )
    g = _generator(model.device, seed)
    per_token = 2 * batch * cfg.num_key_value_heads * cfg.head_dim * 2
    chunk = max(64, FILL_CHUNK_BYTES // per_token // 64 * 64)
    for layer in cache.layers:
        done = 0
        while done < tokens:
            n = min(chunk, tokens - done)
            shape = (batch, cfg.num_key_value_heads, n, cfg.head_dim)
            k, v = _randn(shape, model.device, g), _randn(shape, model.device, g)
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.quantized.append(k, v)
            done += n
    return cache


def _cache_bytes(cache: Any) -> int:
    if hasattr(cache, "quantized_layers"):
        return cache.nbytes
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


def _step_ms(model: Any, cache: Any, batch: int, repeats: int) -> tuple[float, float]:
    """(GPU ms, wall ms) of one decoding step: GPU time with the host queue kept ahead of the GPU
    (:func:`kvpack.bench.harness.time_calls`), wall time as a user sees it."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=model.device)

    def step() -> Any:
        return model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    with torch.no_grad():
        step()
        harness.synchronize(model.device)
        wall = []
        for _ in range(3):
            t0 = time.perf_counter()
            step()
            harness.synchronize(model.device)
            wall.append(time.perf_counter() - t0)
        samples, _ = harness.time_calls(step, [()], repeats, model.device)
    return harness.median(samples) * 1e3, harness.median(wall) * 1e3


def _tokens_per_second(model: Any, cache: Any, batch: int, tokens: int, new: int) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens + 1), device=model.device)
    with torch.no_grad():
        harness.synchronize(model.device)
        t0 = time.perf_counter()
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            past_key_values=cache,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
        )
        harness.synchronize(model.device)
    return batch * new / (time.perf_counter() - t0)


def _largest_batch(model: Any, per_sequence: int, transient_per_sequence: int) -> int:
    free = _free(model.device) - _MEMORY_MARGIN - (1 << 30)
    return max(0, free // (per_sequence + transient_per_sequence))


def _fits(make: Callable[[int], Any], model: Any, batch: int) -> tuple[int, str]:
    """The batch, lowered by one until a filled cache of it runs a decoding step (at most three tries)."""
    for b in range(batch, max(batch - 3, 0), -1):
        cache = None
        try:
            cache = make(b)
            _step_ms(model, cache, b, repeats=1)
            return b, "verified: a filled cache of this batch ran a decoding step"
        except torch.cuda.OutOfMemoryError:
            pass
        finally:
            del cache
            gc.collect()
            torch.cuda.empty_cache()
    return batch, "not verified: out of memory at this batch and the two below"


def run_e2e(args: argparse.Namespace, device: torch.device, progress: Any) -> dict[str, Any]:
    """The end-to-end measurement (see the module doc)."""
    import kvpack.hf_attention  # noqa: F401  (registers attn_implementation="kvpack")

    if device.type != "cuda":
        return {"status": "skipped", "reason": "the end-to-end measurement needs a CUDA GPU"}
    t, batch, new = args.e2e_context, args.e2e_batch, args.e2e_new_tokens
    extra = 4 * args.repeats + 2 * new + 64
    model = llama3_8b_shaped(device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    layers = model.config.num_hidden_layers
    out: dict[str, Any] = {
        "status": "ok",
        "context": t,
        "batch": batch,
        "weights_bytes": weights,
        "model": "Llama-3-8B-shaped, random float16 weights",
        "rows": [],
    }
    makers: dict[str, tuple[str, Callable[[int], Any]]] = {
        "dynamic-fp16": ("sdpa", lambda b: _fill_dynamic(model, b, t, args.seed)),
        "kvpack-int8-fused": ("kvpack", lambda b: _fill_kvpack(model, b, t, args.seed, "fused", extra)),
        "kvpack-int8-dequantize": (
            "sdpa",
            lambda b: _fill_kvpack(model, b, t, args.seed, "dequantize", extra),
        ),
        "static-fp16": ("sdpa", lambda b: _fill_static(model, b, t, args.seed, extra)),
    }
    per_sequence: dict[str, int] = {}
    for name, (impl, make) in makers.items():
        progress.set_postfix_str(f"e2e {name}")
        model.set_attn_implementation(impl)
        row: dict[str, Any] = {"cache": name, "attn_implementation": impl}
        cache = None
        try:
            before = torch.cuda.memory_allocated(device)
            cache = make(batch)
            row["allocated_bytes"] = torch.cuda.memory_allocated(device) - before
            row["step_gpu_ms"], row["step_wall_ms"] = _step_ms(model, cache, batch, args.repeats)
            row["cache_bytes"] = _cache_bytes(cache)
            per_sequence[name] = row["cache_bytes"] // batch
        except Exception as err:  # one cache failing (e.g. another transformers version) leaves the rest
            row["error"] = f"{type(err).__name__}: {err}"[:300]
        out["rows"].append(row)
        del cache
        gc.collect()
        torch.cuda.empty_cache()
        progress.update(1)
    rows = {r["cache"]: r for r in out["rows"]}
    base = rows["dynamic-fp16"]
    for r in out["rows"]:
        if "step_gpu_ms" in r and "step_gpu_ms" in base:
            r["step_speedup"] = base["step_gpu_ms"] / r["step_gpu_ms"]
            r["memory_ratio"] = r["cache_bytes"] / base["cache_bytes"]
        if "step_gpu_ms" in r and "step_gpu_ms" in rows["static-fp16"]:
            r["step_speedup_vs_static"] = rows["static-fp16"]["step_gpu_ms"] / r["step_gpu_ms"]

    # Largest batch at this context: DynamicCache's update concatenates, so a step holds one layer twice.
    progress.set_postfix_str("e2e largest batch")
    for name, transient in (
        ("dynamic-fp16", per_sequence["dynamic-fp16"] // layers),
        ("kvpack-int8-fused", 0),
    ):
        impl, make = makers[name]
        model.set_attn_implementation(impl)
        estimate = _largest_batch(model, per_sequence[name], transient)
        verified, note = _fits(make, model, estimate)
        rows[name].update(max_batch_estimate=estimate, max_batch=verified, max_batch_note=note)
    rows["kvpack-int8-fused"]["max_batch_ratio"] = rows["kvpack-int8-fused"]["max_batch"] / max(
        rows["dynamic-fp16"]["max_batch"], 1
    )
    progress.update(1)

    progress.set_postfix_str("e2e generate")
    for name in ("dynamic-fp16", "kvpack-int8-fused"):
        impl, make = makers[name]
        model.set_attn_implementation(impl)
        for b in (1, batch):
            cache = make(b)
            rows[name][f"generate_tokens_per_s_b{b}"] = _tokens_per_second(model, cache, b, t, new)
            gpu_ms, wall_ms = _step_ms(model, cache, b, 3)
            rows[name][f"step_gpu_ms_b{b}"], rows[name][f"step_wall_ms_b{b}"] = gpu_ms, wall_ms
            del cache
            gc.collect()
            torch.cuda.empty_cache()
    progress.update(1)
    return out


# ------------------------------------------------------------------------------------------- output

_COLUMNS = [
    "method",
    "kv_heads",
    "batch",
    "context",
    "ms",
    "bytes",
    "gbps",
    "of_copy",
    "speedup_vs_sdpa",
    "rel_error",
    "status",
]
_HEADERS = [
    "method",
    "KV heads",
    "batch",
    "context",
    "ms",
    "bytes",
    "GB/s",
    "of copy",
    "x SDPA",
    "rel err",
    "status",
]
_E2E_COLUMNS = [
    "cache",
    "step_gpu_ms",
    "step_wall_ms",
    "step_speedup",
    "step_speedup_vs_static",
    "cache_bytes",
    "memory_ratio",
    "max_batch",
    "generate_tokens_per_s_b1",
    "step_wall_ms_b1",
    "step_gpu_ms_b1",
]
_E2E_HEADERS = [
    "cache",
    "step GPU ms",
    "step wall ms",
    "x dynamic",
    "x static",
    "cache bytes",
    "x memory",
    "max batch",
    "gen tok/s b1",
    "wall ms b1",
    "GPU ms b1",
]


def e2e_rows(e2e: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """The end-to-end rows with the batch-``batch`` generate rate under a fixed key."""
    return [{**r, "generate_tokens_per_s": r.get(f"generate_tokens_per_s_b{batch}")} for r in e2e["rows"]]


def print_tables(results: dict[str, Any]) -> None:
    rows = results["rows"]
    if results.get("copy_gbps"):
        print(f"device-to-device copy: {results['copy_gbps']:.0f} GB/s (read + write)")
    if rows:
        print(harness.text_table([r for r in rows if r["ms"] is not None], _COLUMNS, _HEADERS))
        for r in rows:
            if r["status"] != "ok":
                case = f"H={r['kv_heads']} B={r['batch']} T={r['context']}"
                print(f"{r['status']}: {r['method']} {case}: {r['reason']}")
    e2e = results.get("e2e")
    if e2e and e2e["status"] == "ok":
        b = e2e["batch"]
        print(f"\nend to end: {e2e['model']}, {e2e['context']} cached tokens, batch {b}")
        cols = _E2E_COLUMNS + ["generate_tokens_per_s"]
        print(harness.text_table(e2e_rows(e2e, b), cols, _E2E_HEADERS + [f"gen tok/s b{b}"]))
        for r in e2e["rows"]:
            if "error" in r:
                print(f"{r['cache']}: {r['error']}")
    elif e2e:
        print(f"end to end: {e2e['status']}: {e2e['reason']}")


def plot(results: dict[str, Any], out: Path) -> list[str]:
    """attention.png (speedup over float16 SDPA and fraction of copy bandwidth against context, one
    panel per KV-head count and batch) and e2e.png; returns the files written or why none were."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["matplotlib is not installed (pip install 'kvpack[plots]'): no plots were drawn"]
    written = []
    rows = [r for r in results["rows"] if r["status"] == "ok" and r["method"] != "sdpa-fp16"]
    panels = sorted({(r["kv_heads"], r["batch"]) for r in rows})
    env = results["environment"]
    title = f"{env['device_name']}, {env['date'][:10]}"
    if panels:
        fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 7), squeeze=False)
        for i, (h, b) in enumerate(panels):
            for method in sorted({r["method"] for r in rows}):
                pts = sorted(
                    (r["context"], r["speedup_vs_sdpa"], r["of_copy"])
                    for r in rows
                    if (r["kv_heads"], r["batch"], r["method"]) == (h, b, method)
                )
                axes[0][i].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
                axes[1][i].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=method)
            axes[0][i].axhline(1.0, color="gray", lw=0.8)
            heads = f"{results['settings']['q_heads']} q / {h} KV heads"
            axes[0][i].set(xscale="log", title=f"{heads}, batch {b}", ylabel="speedup over SDPA fp16")
            axes[1][i].set(xscale="log", xlabel="cached tokens", ylabel="fraction of copy bandwidth")
            contexts = sorted({r["context"] for r in rows})
            for ax in axes[:, i]:
                ax.set_xticks(contexts, [f"{c / 1024:g}K" for c in contexts])
                ax.minorticks_off()
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Decode attention, one query token: {title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "attention.png", dpi=120)
        plt.close(fig)
        written.append("attention.png")
    e2e = results.get("e2e")
    if e2e and e2e["status"] == "ok":
        fig, axes = plt.subplots(1, 3, figsize=(12, 4))
        timed = [r for r in e2e["rows"] if "step_gpu_ms" in r]
        names = [r["cache"] for r in timed]
        axes[0].bar(names, [r["step_gpu_ms"] for r in timed])
        axes[0].set(ylabel="ms", title=f"GPU time of a step, batch {e2e['batch']}")
        axes[1].bar(names, [r["cache_bytes"] / 1e9 for r in timed])
        axes[1].set(ylabel="GB", title=f"cache at {e2e['context']} tokens")
        held = [r for r in e2e["rows"] if "max_batch" in r]
        axes[2].bar([r["cache"] for r in held], [r["max_batch"] for r in held])
        axes[2].set(ylabel="sequences", title=f"largest batch at {e2e['context']} tokens")
        for ax in axes:
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        fig.suptitle(f"{e2e['model']}: {title}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "e2e.png", dpi=120)
        plt.close(fig)
        written.append("e2e.png")
    return written


def run(args: argparse.Namespace) -> int:
    """``kvpack bench-attention``: measure, write the files, print the tables (or JSON)."""
    from tqdm.auto import tqdm

    device = _device(args.device)
    if args.quick:
        args.batches, args.contexts, args.kv_heads, args.repeats = [8], [4096, 32768], [8], 5
        args.formats = "int8,int4"
    args.formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = [f for f in args.formats if f not in CACHE_PRESETS]
    if unknown:
        raise ValueError(
            f"unknown cache preset(s) {', '.join(unknown)}; choose among {', '.join(CACHE_PRESETS)}"
        )
    if any(args.q_heads % h for h in args.kv_heads):
        raise ValueError(f"--q-heads {args.q_heads} must be a multiple of every --kv-heads {args.kv_heads}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = harness.environment(device)
    if device.type != "cuda":
        print(
            "no CUDA GPU: the times below are CPU times of the plain-torch path (or of the Triton "
            "interpreter), not the kernel's",
            file=sys.stderr,
        )
    start = time.perf_counter()
    bench = KernelBench(args, device)
    cases = 0 if args.no_kernels else len(args.kv_heads) * len(args.batches) * len(args.contexts)
    with tqdm(
        total=cases + 5 * args.e2e, desc="kvpack bench-attention", file=sys.stderr, disable=None
    ) as progress:
        if cases:
            bench.run(progress)
        e2e = run_e2e(args, device, progress) if args.e2e else None
    env["seconds"] = round(time.perf_counter() - start, 1)
    results = {
        "kind": "kvpack-bench-attention",
        "environment": env,
        "settings": {
            k: getattr(args, k)
            for k in ("batches", "contexts", "kv_heads", "q_heads", "head_dim", "formats", "repeats", "seed",
                      "timing")
        }
        | {"residual": RESIDUAL},
        "copy_gbps": bench.copy_gbps,
        "rows": [asdict(r) for r in bench.rows],
        "e2e": e2e,
    }
    harness.write_json(out / "attention.json", results)
    harness.write_csv(out / "attention.csv", results["rows"])
    if e2e and e2e["status"] == "ok":
        harness.write_csv(out / "e2e.csv", e2e["rows"])
    notes = [] if args.no_plots else plot(results, out)
    if args.json:
        print(harness.json_text(results))
    else:
        print_tables(results)
        for note in notes:
            if not note.endswith(".png"):
                print(note)
        print(f"\nwrote {out}/attention.json, attention.csv in {env['seconds']:.0f} s")
    return 1 if any(r.status == "error" for r in bench.rows) else 0
