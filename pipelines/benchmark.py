"""`dynloss benchmark SUBCOMMAND ...` / `python -m pipelines.benchmark SUBCOMMAND ...` (pipelines/benchmarks/).

    python -m pipelines.benchmark step --models small_cnn resnet32 --json step.json
    python -m pipelines.benchmark ingest --data data/digits --split train --preset digits --epochs 2
    python -m pipelines.benchmark epoch --config pipelines/configs/fashion_mnist_lt.yaml
    python -m pipelines.benchmark scaling --model resnet32 --batch-size 128 --json scaling.json
"""
from __future__ import annotations

import argparse
import sys

from pipelines.benchmarks import SUBCOMMANDS, epoch, ingest, scaling, step  # noqa: F401  (fill the registry)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynloss benchmark", description="Benchmarks that print ratios measured "
                                     "in one run (docs/performance.md).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(SUBCOMMANDS) + "}")
    for name, (help_text, configure) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(run=configure(p))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:  # a missing or unprepared --data, an unknown preset: a message, not a traceback
        print(f"benchmark {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
