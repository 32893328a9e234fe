"""How much memory a model's KV cache takes, in each format: model presets and the ``kvpack size`` command.

Every decoder layer caches one key and one value vector per KEY/VALUE head per token, so for one
sequence in a plain dtype::

    bytes = 2 (K and V) x layers x kv_heads x head_dim x tokens x bytes per element

Grouped-query attention makes ``kv_heads`` smaller than the query heads: Llama 3 70B caches 8 heads,
not 64. Quantized formats are counted with :meth:`kvpack.schemes.Scheme.nbytes`, so the scales and
zero points are included. Each ``[tokens, head_dim]`` slice of one (sequence, layer, head) has its own
scales, as a cache stores them. The few most recent tokens that kvpack's cache keeps in full precision
(its residual window, a constant independent of the context length) are not counted.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from kvpack.cache import CACHE_PRESETS
from kvpack.schemes import Scheme, parse

#: Context length used when neither ``--tokens`` nor the model says otherwise.
DEFAULT_TOKENS = 131072

#: Plain dtypes: bytes per element.
PLAIN_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}

#: The formats ``kvpack size`` lists, in order.
SIZE_FORMATS = ("fp32", "fp16", "fp8", "int8", "int4", "int2")


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a model's KV cache.

    Attributes:
        name: a label (preset name, or where a config came from).
        layers: decoder layers.
        kv_heads: key/value heads per layer (grouped-query attention caches only these).
        head_dim: channels per head.
        q_heads: query heads (for information: they do not enter the cache size).
        context: the model's maximum context length, when known (``max_position_embeddings``).
    """

    name: str
    layers: int
    kv_heads: int
    head_dim: int
    q_heads: int | None = None
    context: int | None = None

    def __post_init__(self) -> None:
        for field in ("layers", "kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field} must be a positive integer, got {value!r}")
        if self.q_heads is not None and self.q_heads % self.kv_heads:
            raise ValueError(
                f"query heads ({self.q_heads}) must be a multiple of key/value heads ({self.kv_heads})"
            )


#: Published configurations (the models' own config.json files).
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llama-3-8b", layers=32, kv_heads=8, head_dim=128, q_heads=32),
        ModelSpec("llama-3-70b", layers=80, kv_heads=8, head_dim=128, q_heads=64),
        ModelSpec("llama-2-7b", layers=32, kv_heads=32, head_dim=128, q_heads=32),
        ModelSpec("llama-2-70b", layers=80, kv_heads=8, head_dim=128, q_heads=64),
        ModelSpec("mistral-7b", layers=32, kv_heads=8, head_dim=128, q_heads=32),
        ModelSpec("qwen2.5-7b", layers=28, kv_heads=4, head_dim=128, q_heads=28),
        ModelSpec("qwen2.5-72b", layers=80, kv_heads=8, head_dim=128, q_heads=64),
        ModelSpec("smollm2-135m", layers=30, kv_heads=3, head_dim=64, q_heads=9),
    )
}


def _positive(cfg: dict, key: str, where: str) -> int:
    value = cfg.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{where}: {key!r} must be a positive integer, got {value!r}")
    return value


def from_config(path: str | Path) -> ModelSpec:
    """Read a transformers ``config.json`` (or a folder holding one).

    Uses ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads`` (defaults to the
    attention heads: no grouped-query attention), ``head_dim`` (defaults to ``hidden_size /
    num_attention_heads``) and ``max_position_embeddings``. A multimodal config's ``text_config`` is
    used when the top level has no layers.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ValueError(f"no model config at {path}: give a preset name or a transformers config.json")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    where = str(path)
    layers = _positive(cfg, "num_hidden_layers", where)
    heads = _positive(cfg, "num_attention_heads", where)
    kv_heads = _positive(cfg, "num_key_value_heads", where) if cfg.get("num_key_value_heads") else heads
    if cfg.get("head_dim"):
        head_dim = _positive(cfg, "head_dim", where)
    else:
        hidden = _positive(cfg, "hidden_size", where)
        if hidden % heads:
            raise ValueError(f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
        head_dim = hidden // heads
    context = cfg.get("max_position_embeddings")
    return ModelSpec(
        name=cfg.get("_name_or_path") or path.parent.name or str(path),
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        q_heads=heads,
        context=context if isinstance(context, int) and context > 0 else None,
    )


def get(model: str | ModelSpec) -> ModelSpec:
    """A preset by name (``"llama-3-70b"``), a ``config.json`` path, or a ModelSpec as is."""
    if isinstance(model, ModelSpec):
        return model
    key = model.strip().lower()
    if key in PRESETS:
        return PRESETS[key]
    if key.endswith(".json") or Path(model).exists():
        return from_config(model)
    raise ValueError(f"unknown model {model!r}; presets: {', '.join(PRESETS)} (or a path to a config.json)")


def cache_formats(fmt: str | tuple[str, str]) -> tuple[str, str]:
    """The (key, value) formats a format name stands for in a KV cache.

    A plain dtype (``fp32``, ``fp16``, ``bf16``) is used for both. A preset of
    :data:`kvpack.cache.CACHE_PRESETS` (``int8``, ``int4``, ``int2``, ``fp8``) means the layout
    kvpack's cache stores: keys per channel in blocks of 64 tokens (a block's scales are fixed once
    its 64 tokens have arrived), values per token. A full format name (``int8-token-g32``) is used
    for both; a pair gives each its own.

    >>> cache_formats("int4")
    ('int4-channel-g64', 'int4-token')
    """
    if isinstance(fmt, tuple):
        if len(fmt) != 2:
            raise ValueError(f"a (key, value) format pair has two names, got {fmt!r}")
        return fmt[0], fmt[1]
    name = fmt.strip().lower()
    if name in PLAIN_BYTES:
        return name, name
    if name in CACHE_PRESETS:
        key, value = CACHE_PRESETS[name]
        return parse(key).name, parse(value).name
    return parse(name).name, parse(name).name


def tensor_bytes(fmt: str, shape: tuple[int, ...]) -> int:
    """Bytes of one tensor of ``shape [..., tokens, head_dim]`` stored as ``fmt`` (plain or kvpack)."""
    if fmt in PLAIN_BYTES:
        return math.prod(shape) * PLAIN_BYTES[fmt]
    scheme: Scheme = parse(fmt)
    return scheme.nbytes(shape)


def kv_bytes(model: str | ModelSpec, tokens: int, batch: int = 1, fmt: str | tuple[str, str] = "fp16") -> int:
    """Bytes of the KV cache of ``batch`` sequences of ``tokens`` tokens, metadata included.

    ``fmt`` as in :func:`cache_formats`. Each (sequence, layer, KV head) slice ``[tokens, head_dim]``
    has its own scales.

    >>> kv_bytes("llama-3-70b", 131072)
    42949672960
    """
    spec = get(model)
    if not isinstance(tokens, int) or tokens < 1:
        raise ValueError(f"tokens must be a positive integer, got {tokens!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    key_fmt, value_fmt = cache_formats(fmt)
    shape = (batch * spec.layers * spec.kv_heads, tokens, spec.head_dim)
    return tensor_bytes(key_fmt, shape) + tensor_bytes(value_fmt, shape)


def size_table(model: str | ModelSpec, tokens: int, batch: int = 1) -> list[dict]:
    """One row per format of :data:`SIZE_FORMATS`: formats used, bytes, GiB, ratio to fp16, bytes/token."""
    spec = get(model)
    fp16 = kv_bytes(spec, tokens, batch, "fp16")
    rows = []
    for fmt in SIZE_FORMATS:
        key_fmt, value_fmt = cache_formats(fmt)
        nbytes = kv_bytes(spec, tokens, batch, fmt)
        rows.append(
            {
                "format": fmt,
                "keys": key_fmt,
                "values": value_fmt,
                "bytes": nbytes,
                "gib": nbytes / 2**30,
                "vs_fp16": nbytes / fp16,
                "bytes_per_token": nbytes / (tokens * batch),
            }
        )
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``kvpack size``."""
    parser.description = (
        "KV-cache memory of a model for a context length and batch, in fp32, fp16, fp8, int8, int4 and "
        "int2, scales and zero points included. The quantized rows store keys per channel in blocks of "
        "64 tokens and values per token, as kvpack's cache does (the keys and values columns name the "
        "formats). Uses key/value heads (grouped-query attention)."
    )
    parser.add_argument("--model", help="a preset (see --list-models) or a transformers config.json path")
    parser.add_argument("--layers", type=int, help="decoder layers (instead of --model)")
    parser.add_argument("--kv-heads", type=int, help="key/value heads per layer (instead of --model)")
    parser.add_argument("--head-dim", type=int, help="channels per head (instead of --model)")
    parser.add_argument(
        "--tokens",
        type=int,
        help="context length per sequence (default: a config.json's max_position_embeddings, "
        f"else {DEFAULT_TOKENS})",
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences in the batch (default 1)")
    parser.add_argument("--list-models", action="store_true", help="list the model presets and exit")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _spec_from_args(args: argparse.Namespace) -> ModelSpec:
    explicit = (args.layers, args.kv_heads, args.head_dim)
    if args.model and any(v is not None for v in explicit):
        raise ValueError("give either --model or --layers/--kv-heads/--head-dim, not both")
    if args.model:
        return get(args.model)
    if any(v is None for v in explicit):
        raise ValueError("give --model NAME|config.json, or all of --layers, --kv-heads and --head-dim")
    return ModelSpec("custom", layers=args.layers, kv_heads=args.kv_heads, head_dim=args.head_dim)


def run(args: argparse.Namespace) -> int:
    """``kvpack size``: print the table (or JSON)."""
    from kvpack.bench.harness import text_table

    if args.list_models:
        models = [asdict(m) for m in PRESETS.values()]
        if args.json:
            print(json.dumps(models, indent=2))
        else:
            print(text_table(models, ["name", "layers", "kv_heads", "head_dim", "q_heads"]))
        return 0
    spec = _spec_from_args(args)
    tokens = args.tokens if args.tokens is not None else (spec.context or DEFAULT_TOKENS)
    rows = size_table(spec, tokens, args.batch)
    if args.json:
        print(
            json.dumps({"model": asdict(spec), "tokens": tokens, "batch": args.batch, "rows": rows}, indent=2)
        )
        return 0
    heads = f", {spec.q_heads} query heads" if spec.q_heads else ""
    print(
        f"{spec.name}: {spec.layers} layers, {spec.kv_heads} KV heads x {spec.head_dim}{heads}; "
        f"{tokens} tokens x batch {args.batch}"
    )
    print("quantized rows as kvpack's cache stores them: keys per channel in blocks of 64 tokens, values per")
    print("token; scales and zero points counted; the cache's small full-precision window is not")
    shown = [
        {
            **r,
            "bytes": f"{r['bytes']:,}",
            "gib": f"{r['gib']:.3f}",
            "vs_fp16": f"{r['vs_fp16']:.4f}",
            "bytes_per_token": f"{r['bytes_per_token']:,.1f}",
        }
        for r in rows
    ]
    columns = ["format", "keys", "values", "bytes", "gib", "vs_fp16", "bytes_per_token"]
    print(text_table(shown, columns, ["format", "keys", "values", "bytes", "GiB", "x fp16", "bytes/token"]))
    return 0
