"""The `deltatune` command. Subcommands so far: `methods` (what is registered) and `show` (describe an
adapter folder without loading a model). Training, evaluation and the demo come with the trainer."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import __version__, registered_methods
from .errors import DeltaTuneError


def _methods(arguments: argparse.Namespace) -> None:
    for name in registered_methods():
        print(name)


def _show(arguments: argparse.Namespace) -> None:
    from safetensors import safe_open

    from .io import CONFIG_FILE, WEIGHTS_FILE, _read_json

    folder = Path(arguments.path)
    config = _read_json(folder / CONFIG_FILE)
    kind = "peft" if "peft_type" in config else "deltatune"
    method = config.get("peft_type") or config.get("method")
    print(f"{folder}: {kind} adapter, method {method}")
    weights = folder / WEIGHTS_FILE
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as file:
            count = sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())
            tensors = len(list(file.keys()))
        print(f"  {tensors} tensors, {count:,} parameters, {weights.stat().st_size / 1e6:.2f} MB")
    print(json.dumps(config.get("config", config), indent=2, sort_keys=True))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltatune", description="Parameter-efficient fine-tuning for PyTorch models.")
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("methods", help="list the registered methods").set_defaults(run=_methods)
    show = commands.add_parser("show", help="describe an adapter folder (deltatune or peft)")
    show.add_argument("path")
    show.set_defaults(run=_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        arguments.run(arguments)
    except DeltaTuneError as error:
        print(f"deltatune: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
