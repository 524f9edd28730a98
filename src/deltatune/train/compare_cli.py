"""The `deltatune compare` subcommand's arguments (`cli.py` registers it); the work is in `compare.py`,
imported only when the command runs, so that `deltatune --help` stays quick."""

from __future__ import annotations

import argparse


def add_command(commands: argparse._SubParsersAction) -> None:
    """Register `compare` with the `deltatune` command's subcommands."""
    comparing = commands.add_parser("compare", help="train several methods on the same data, budget and seed; compare")
    comparing.add_argument("config", help="the YAML config every method starts from")
    comparing.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every method")
    comparing.add_argument("--methods", required=True, help="comma-separated registered methods, e.g. lora,bitfit,full")
    budget = comparing.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=int, help="optimizer steps for every method")
    budget.add_argument("--epochs", type=float, help="epochs for every method")
    budget.add_argument("--time-budget", type=float, metavar="SECONDS", help="seconds of training time per method")
    comparing.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="LABEL.KEY=VALUE",
        help="an override for one compared method (LABEL: its label in --methods)",
    )
    comparing.add_argument("--metric", help="the eval metric of the table and plot (default: the task's main one)")
    comparing.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")
    comparing.add_argument("--quiet", action="store_true", help="no progress bars")
    comparing.set_defaults(run=run)


def run(arguments: argparse.Namespace) -> None:
    from .compare import CompareOptions, compare
    from .compare_plan import Budget

    compare(
        CompareOptions(
            config=arguments.config,
            methods=[name.strip() for name in arguments.methods.split(",") if name.strip()],
            overrides=arguments.overrides,
            method_overrides=arguments.set,
            budget=Budget(arguments.max_steps, arguments.epochs, arguments.time_budget),
            metric=arguments.metric,
            overwrite=arguments.overwrite,
            progress=not arguments.quiet,
        )
    )
