"""The `deltatune` command.

    deltatune demo [--out DIR] [key=value ...]   the main job: fine-tune SmolLM2 on a generated task (quantize=nf4)
    deltatune train CONFIG.yaml [key=value ...] [--resume [CHECKPOINT]]
    deltatune eval CONFIG.yaml [key=value ...] [--adapter DIR | --base]
    deltatune compare CONFIG.yaml --methods lora,bitfit,full [--max-steps N | --epochs E | --time-budget S]
        [--set LABEL.KEY=VALUE ...] [--metric M] [--overwrite] [key=value ...]   same data, budget, seed for each
    deltatune merge MODEL ADAPTER OUT [--overwrite]   a full model folder with the adapter merged in
        [--quantize NAME --dequantize [--dtype D] [--requantize NAME]]   ... from a quantized base
    deltatune inspect MODEL|CONFIG.yaml [--adapter DIR]   the module tree, parameters counted
    deltatune export ADAPTER --gguf OUT.gguf [--base MODEL]   a llama.cpp LoRA file and an Ollama Modelfile
        [--merged --base FILE.gguf --dtype f16|q8_0]   ... or that GGUF base with the adapter merged in
    deltatune methods [NAME]                     the registered methods, or NAME's config fields documented
    deltatune show ADAPTER                       describe an adapter folder

`train` and `eval` compute with the CPU threads the config's `threads` names (`threads=2` on the command
line), or by default with the cores the machine leaves free (`deltatune.train.threads`).

Errors in input (data, config, names, files) end with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .. import registered_methods
from ..errors import DeltaTuneError
from ..folder_summary import describe_folder
from ..peft_releases import minimum_peft_version
from ..version import __version__
from . import compare_cli
from .cli_warnings import one_line_warnings
from .import_notes import quiet_import_notes
from .merge_command import DTYPES, REQUANTIZE_NAMES, merge_command
from .quantize import QUANTIZE_OPTIONS


def _methods(arguments: argparse.Namespace) -> None:
    if arguments.name:
        from .field_help import method_help

        print(method_help(arguments.name))
        return
    for name in registered_methods():
        print(name)


def _show(arguments: argparse.Namespace) -> None:
    summary = describe_folder(arguments.path)
    print(f"{Path(arguments.path)}: {summary.kind} adapter, method {summary.method}")
    if summary.weights is not None:
        tensors, count = summary.tensor_count()
        print(f"  {tensors} tensors, {count:,} parameters, {summary.weights.stat().st_size / 1e6:.2f} MB")
    if summary.kind == "peft" and (release := minimum_peft_version(arguments.path)) is not None:
        print(
            f"  loads in peft {release} or later (the first release that reads every key, setting and layer it holds)"
        )
    print(json.dumps(summary.config, indent=2, sort_keys=True))


def _config(path: str, overrides: list[str]):
    from .config import TrainConfig

    return TrainConfig.from_yaml(path, overrides)


def _train(arguments: argparse.Namespace) -> None:
    from .checkpoint import ADAPTER_FOLDER
    from .loop import train
    from .report import METRICS_FILE

    config = _config(arguments.config, arguments.overrides)
    again = shlex.join(["deltatune", "eval", arguments.config, *arguments.overrides])
    result = train(config, resume=arguments.resume, progress=not arguments.quiet, evaluate_again=again)
    print(f"adapter saved in {result.output_dir / ADAPTER_FOLDER}; metrics in {result.output_dir / METRICS_FILE}")


def _eval(arguments: argparse.Namespace) -> None:
    from .checkpoint import ADAPTER_FOLDER
    from .loop import prepare_run

    config = _config(arguments.config, arguments.overrides)
    if not config.eval_file:
        raise DeltaTuneError("the config has no eval_file; add one or pass eval_file=PATH")
    adapter = arguments.adapter or str(Path(config.output_dir) / ADAPTER_FOLDER)
    run = prepare_run(config, adapter=adapter)
    if arguments.base:
        with run.delta_model.disabled():
            result = run.evaluate()
    else:
        result = run.evaluate()
    print(json.dumps(result.metrics, indent=2))


def _inspect(arguments: argparse.Namespace) -> None:
    from .tree import describe_tree

    if arguments.target.endswith((".yaml", ".yml")):
        from .loop import prepare_run

        model = prepare_run(_config(arguments.target, arguments.overrides), adapter=arguments.adapter).delta_model
    else:
        from .. import load
        from .models import load_model

        model = load_model(arguments.target, adapter=arguments.adapter)
        if arguments.adapter:
            model = load(model, arguments.adapter)
    print(describe_tree(model, arguments.depth))


def _export(arguments: argparse.Namespace) -> None:
    from .export import export_adapter, export_merged

    given = (arguments.adapter, arguments.gguf, arguments.base)
    if arguments.merged:
        path = export_merged(*given, arguments.dtype or "f16", arguments.overwrite)
        print(f"merged llama.cpp model written to {path}")
        return
    done = export_adapter(*given, arguments.dtype or "f32", arguments.overwrite)
    print(f"llama.cpp LoRA ({done.tensors} tensors) written to {done.path}; Ollama Modelfile: {done.modelfile}")


def _demo(arguments: argparse.Namespace) -> None:
    from .demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(
            out=arguments.out,
            model=arguments.model,
            method=arguments.method,
            data=arguments.data,
            steps=arguments.steps,
            examples=arguments.examples,
            overrides=arguments.overrides,
            overwrite=arguments.overwrite,
        )
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune", description="Parameter-efficient fine-tuning for PyTorch models."
    )
    parser.add_argument("--version", action="version", version=f"deltatune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    methods = commands.add_parser("methods", help="list the registered methods, or one method's config fields")
    methods.add_argument("name", nargs="?", help="a method: print its config fields with their documents and defaults")
    methods.set_defaults(run=_methods)
    show = commands.add_parser("show", help="describe an adapter folder (deltatune or peft)")
    show.add_argument("path")
    show.set_defaults(run=_show)

    from .field_help import train_epilog

    train = commands.add_parser(
        "train",
        help="train an adapter from a YAML config",
        epilog=train_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("config", help="the YAML config file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. adapter.r=16")
    train.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest checkpoint in output_dir, or from CHECKPOINT",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar, start line or new-head line")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a trained adapter on the config's eval_file")
    evaluate.add_argument("config")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value")
    evaluate.add_argument("--adapter", help="adapter folder (default: OUTPUT_DIR/adapter)")
    evaluate.add_argument("--base", action="store_true", help="evaluate the base model (adapter disabled)")
    evaluate.set_defaults(run=_eval)

    compare_cli.add_command(commands)

    merge = commands.add_parser("merge", help="write a full model folder with an adapter merged in")
    merge.add_argument("model", help="model folder, or a packaged model name (smollm2)")
    merge.add_argument("adapter", help="adapter folder (deltatune or peft)")
    merge.add_argument("out", help="a new (or empty) folder to write the merged model into; never an input folder")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it already holds files")
    merge.add_argument(
        "--allow-other-base",
        action="store_true",
        help="merge an adapter whose folder records other base weights than MODEL's (refused otherwise)",
    )
    merge.add_argument(
        "--quantize",
        choices=list(QUANTIZE_OPTIONS),
        help="load the base quantized, as the adapter was trained on it (needs --dequantize)",
    )
    merge.add_argument(
        "--dequantize",
        action="store_true",
        help="dequantize every quantized layer and add the adapter in float32: a plain full-precision model",
    )
    merge.add_argument(
        "--requantize",
        choices=REQUANTIZE_NAMES,
        help="quantize the dequantized merge again and write it as a quantized checkpoint (implies --dequantize)",
    )
    merge.add_argument(
        "--dtype",
        choices=DTYPES,
        help="dtype of the written float weights (default: float32 when dequantizing, else the model's own)",
    )
    merge.set_defaults(run=merge_command)

    inspect = commands.add_parser("inspect", help="print the module tree with frozen / trainable / adapter parameters")
    inspect.add_argument("target", help="a model folder or packaged name, or a training config (.yaml)")
    inspect.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (with a .yaml target)")
    inspect.add_argument("--adapter", help="an adapter folder to load onto the model")
    inspect.add_argument("--depth", type=int, default=6, help="deepest level shown (default 6)")
    inspect.set_defaults(run=_inspect)

    export = commands.add_parser("export", help="write a LoRA adapter as a llama.cpp GGUF file (and a Modelfile)")
    export.add_argument("adapter", help="adapter folder (deltatune or peft)")
    export.add_argument("--gguf", required=True, metavar="OUT.gguf", help="the llama.cpp LoRA file to write")
    export.add_argument("--base", help="base model folder, packaged name or .gguf (default: the adapter's own)")
    export.add_argument("--merged", action="store_true", help="write the GGUF base with the adapter merged in")
    export.add_argument(
        "--dtype", choices=["f32", "f16", "q8_0"], help="adapter: f32 (default) or f16; --merged: f16 (default) or q8_0"
    )
    export.add_argument("--overwrite", action="store_true", help="replace OUT.gguf (and its Modelfile) if they exist")
    export.set_defaults(run=_export)

    demo = commands.add_parser(
        "demo", help="the main job: fine-tune SmolLM2-135M-Instruct on a generated task, offline"
    )
    demo.add_argument("--out", default="deltatune-demo", help="output folder (default ./deltatune-demo)")
    demo.add_argument("--model", default="smollm2", help="model folder or packaged name (default smollm2)")
    demo.add_argument("--method", default="lora", help="a registered method (default lora)")
    demo.add_argument("--data", help="a prompt/completion JSONL file to use instead of the generated task")
    demo.add_argument("--steps", type=int, help="optimizer steps (default: the demo's budget)")
    demo.add_argument("--examples", type=int, help="evaluation examples (default 64)")
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run's or demo's work in --out (only what deltatune wrote there goes)",
    )
    demo.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="training config overrides, e.g. learning_rate=1e-3 adapter.r=4",
    )
    demo.set_defaults(run=_demo)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, letting `key=value` overrides come after options too (`train c.yaml --quiet lr=1`,
    `train c.yaml --resume lr=1`: an override, not a checkpoint path)."""
    parser = build_parser()
    arguments, extra = parser.parse_known_args(argv)
    resume = getattr(arguments, "resume", None)
    if isinstance(resume, str) and "=" in resume and not Path(resume).exists():
        arguments.resume, extra = True, [resume, *extra]
    stray = [item for item in extra if item.startswith("-") or not hasattr(arguments, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        arguments.overrides = [*arguments.overrides, *extra]
    return arguments


def main(argv: list[str] | None = None) -> int:
    quiet_import_notes()
    arguments = parse(argv)
    try:
        with one_line_warnings():
            arguments.run(arguments)
    except DeltaTuneError as error:
        print(f"deltatune: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # its message, where there is one, says what was kept
        print(f"deltatune: interrupted{f'; {interrupt}' if interrupt.args else ''}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
