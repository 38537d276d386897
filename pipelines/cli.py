"""The ``dynloss`` console script: ``dynloss SUB args`` runs ``pipelines.SUB.main(args)``.

    dynloss prepare digits --out data/digits
    dynloss train --config pipelines/configs/digits.yaml --set train.epochs=3
    dynloss tune --config pipelines/configs/fashion_mnist_lt.yaml --space tune_spaces/metadata_size.yaml
    dynloss evaluate --checkpoint runs/digits-dynamic/checkpoint_epoch0019 --data data/digits_lt01_sym03
    dynloss benchmark ingest --data data/digits --split train --preset digits

Each subcommand is also ``python -m pipelines.SUB`` (what ``ray job submit`` runs). An unknown subcommand
prints the list and exits with status 2.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, str] = {
    "prepare": "turn a dataset source into parquet shards + manifest",
    "train": "train with the Dynamic Loss or a robust loss on Ray Train (DDP, checkpoints, MLflow)",
    "tune": "Ray Tune sweep (ASHA, random/grid or Optuna) over a tune_spaces/*.yaml space, logged to MLflow",
    "evaluate": "top-1/top-5, per-class and many/medium/few-shot accuracy of a checkpoint",
    "benchmark": "benchmarks that print ratios: step (meta step vs CE), ingest, epoch (Ray vs in memory), scaling",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: dynloss COMMAND [ARGS...]   (dynloss COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {what}" for name, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"dynloss: unknown command {command!r}{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"pipelines.{command}")
    except ModuleNotFoundError as e:
        if e.name != f"pipelines.{command}":
            raise
        print(f"dynloss: {command} is not available in this installation (no module pipelines.{command})",
              file=sys.stderr)
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
