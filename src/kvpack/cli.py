"""The ``kvpack`` command.

Each subcommand lives in its own module, which offers ``add_arguments(parser)`` and ``run(args) -> int``;
only the module of the command being run is imported, so a command whose module (or one of its
optional dependencies) is missing fails alone, with a message, and leaves the others working.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

#: command -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("kvpack.bench.quant", "the paper's quantize/dequantize benchmark on this machine (CPU or GPU)"),
    "accuracy": (
        "kvpack.accuracy",
        "every format's error metrics on synthetic keys, values and the paper's inputs",
    ),
    "size": (
        "kvpack.models",
        "KV-cache memory of a model in fp32/fp16/fp8/int8/int4/int2, metadata included",
    ),
    "eval": ("kvpack.eval", "accuracy of a quantized KV cache on a real model"),
    "bench-attention": (
        "kvpack.bench.attention",
        "decode attention over a quantized KV cache: time and bandwidth",
    ),
}

_DESCRIPTION = (
    "kvpack: quantized KV caches for large language models (INT8/INT4/INT2/FP8). "
    "Run 'kvpack COMMAND --help' for a command's options; every command takes --json."
)


class CommandUnavailable(Exception):
    """A command whose module is not part of this installation."""


def _load(command: str) -> ModuleType:
    module, _ = COMMANDS[command]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name and (module == err.name or module.startswith(err.name + ".")):
            raise CommandUnavailable(
                f"the '{command}' command is not available in this installation (module {module} is missing)"
            ) from None
        raise RuntimeError(
            f"the '{command}' command needs the package {err.name!r}, which is not installed: {err}"
        ) from None


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (the first word that is not an option), if any."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its options."""
    from kvpack import __version__

    parser = argparse.ArgumentParser(prog="kvpack", description=_DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"kvpack {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, summary) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=summary)
        if name == command:
            _load(name).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kvpack`` command; returns the exit status (2 for bad arguments or a kvpack error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = _command(argv)
    try:
        parser = build_parser(command if command in COMMANDS else None)
        args = parser.parse_args(argv)
        return int(_load(args.command).run(args) or 0)
    except SystemExit as exc:  # argparse: --help / --version (0) and bad arguments (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except CommandUnavailable as err:
        print(f"kvpack: {err}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, RuntimeError) as err:
        print(f"kvpack: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvpack: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
