"""The benchmarks behind `dynloss benchmark SUBCOMMAND`, one module each; every one prints a table of ratios
measured in one run and can write its numbers as JSON (`--json PATH`). docs/performance.md records the figures.

A new benchmark is a module here with one function decorated with @subcommand: it adds its arguments to the
parser it is given and returns the function that runs it (exit code). Modules import Ray only inside the
benchmarks that need it: `step` runs where torch alone is installed (a GPU image without Ray).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable

Runner = Callable[[argparse.Namespace], int]
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Runner]]] = {}


def subcommand(name: str, help: str):
    """Register `configure(parser) -> run(args) -> exit code` as `benchmark NAME`."""

    def register(configure: Callable[[argparse.ArgumentParser], Runner]):
        SUBCOMMANDS[name] = (help, configure)
        return configure

    return register


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's architecture, for a report's header."""
    import platform

    import torch

    if str(device).startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}"


def emit(report: dict, printer: Callable[[dict], None], json_path: str | None) -> None:
    """Print a benchmark's table, and write its numbers to ``json_path`` when one is given (``--json``)."""
    printer(report)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(report, f, indent=2)
