"""Evaluate a training checkpoint on a prepared split: top-1/top-5, per-class and many/medium/few-shot accuracy.

    python -m pipelines.evaluate --checkpoint runs/digits-dynamic/checkpoint_epoch0019 --data data/digits_lt01_sym03
    dynloss evaluate --checkpoint PATH --data DIR [--split test] [--batch-size 256] [--json OUT.json]

The same numbers as the training loop's ``eval/*`` metrics (``eval_metrics`` is shared): the model, the
augmentation preset and the shot thresholds come from the checkpoint (its resolved config and the training
class counts), the images from ``--data`` read in-process with the preset's eval view. Runs without Ray.

Shot groups (Liu et al. 2019, ImageNet-LT): many-shot classes have more than 100 training images, few-shot
fewer than 20. Those cut-offs assume ImageNet-LT's 1280..5 range; when they leave a group empty on a smaller
dataset (CIFAR-10-LT 5000..50, Fashion-MNIST-LT 6000..60) the classes are split into thirds by training count
instead (``shot_thresholds``); ``train.shot_thresholds: [many, few]`` in the config sets them explicitly.
Raises ValueError (exit 2) for a path that is not a checkpoint, an unreadable (truncated) state.pt, a dataset
without the split, or one that does not match the checkpoint (class count, class names, channels, image size).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping

from dynloss.metrics import eval_metrics, prediction_arrays, shot_thresholds  # noqa: F401 (re-exported)


def evaluate_checkpoint(checkpoint: str, data: str, split: str = "test", batch_size: int = 256,
                        device: str | None = None) -> dict:
    """Metrics of the checkpoint's model on ``data/split``; also ``per_class`` and ``classes``."""
    import torch

    from dynloss.checkpoint import eval_weights, load_state
    from dynloss.config import Config
    from dynloss.data import read_manifest
    from dynloss.data.batches import iter_local_batches
    from dynloss.engine import predict

    state = load_state(checkpoint)
    cfg = Config.model_validate(state["config"])
    extra = state.get("extra") or {}
    manifest = read_manifest(data)
    if split not in manifest["splits"]:
        raise ValueError(f"{data}: no split {split!r}; it has {', '.join(manifest['splits'])}")
    mismatch = dataset_mismatch(extra, manifest)
    if mismatch:
        raise ValueError(f"{data} does not match the checkpoint {checkpoint}: {'; '.join(mismatch)}; evaluate it on "
                         "the dataset it was trained for (a prepared split of the same classes and image format)")
    model, preset = build_eval_model(cfg, extra, manifest)
    model.load_state_dict(eval_weights(state))  # the weights its eval/* metrics used (the average or the trained)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    batches = ({"x": preset.normalise(b["x"].to(device)), "label": b["label"]}
               for b in iter_local_batches(data, split, preset, train=False, batch_size=batch_size, shuffle=False))
    arrays = prediction_arrays(predict(model, batches))
    thresholds = cfg.train.shot_thresholds
    metrics, per_class = eval_metrics(arrays["pred"], arrays["label"], arrays["top5_hit"], extra["train_counts"],
                                      thresholds)
    return {**metrics, "epoch": state["epoch"], "per_class": per_class.tolist(),
            "classes": extra.get("classes") or [str(c) for c in range(len(per_class))]}


def dataset_mismatch(extra: Mapping, manifest: Mapping) -> list[str]:
    """What differs between the dataset a checkpoint was trained on (its ``extra``) and ``manifest``."""
    out = []
    trained, here = extra.get("num_classes"), manifest.get("num_classes")
    if trained is not None and here is not None and int(trained) != int(here):
        out.append(f"{here} classes, the checkpoint has {trained}")
    names, here_names = list(extra.get("classes") or []), list(manifest.get("classes") or [])
    if names and here_names and names != here_names and len(names) == len(here_names):
        diff = [f"{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(here_names, names)) if a != b]
        out.append(f"class names differ ({', '.join(diff[:3])}{', ...' if len(diff) > 3 else ''})")
    mode, here_mode = extra.get("mode"), (manifest.get("image") or {}).get("mode")
    if mode and here_mode and mode != here_mode:
        out.append(f"images are {here_mode} ({len(here_mode)} channel{'s' * (len(here_mode) > 1)}), the checkpoint "
                   f"was trained on {mode}")
    size, here_size = extra.get("image_size"), (manifest.get("image") or {}).get("size")
    if size and here_size and list(size) != list(here_size):
        out.append(f"images are {here_size[0]}x{here_size[1]}, the checkpoint was trained on {size[0]}x{size[1]}")
    return out


def build_eval_model(cfg, extra: Mapping, manifest: Mapping):
    """The checkpoint's classifier (untrained) and its augmentation preset, as the training loop built them."""
    from dynloss.data.batches import resolve_preset
    from dynloss.data.decode import mode_from_manifest
    from dynloss.data.transforms import preset_for_source
    from dynloss.models import build_model

    preset_name = cfg.data.preset or extra.get("preset") or preset_for_source(manifest["source"])
    preset = resolve_preset(preset_name, mode=extra.get("mode") or mode_from_manifest(manifest),
                            **cfg.data.preset_params)
    model = build_model(cfg.model.name, extra.get("num_classes", manifest["num_classes"]),
                        in_chans=preset.channels, pretrained=False)
    return model, preset


def format_report(result: Mapping) -> str:
    head = (f"epoch {result['epoch']}: top-1 {result['eval/top1']:.2%}  top-5 {result['eval/top5']:.2%}  "
            f"many {result['eval/many_shot']:.2%}  medium {result['eval/medium_shot']:.2%}  "
            f"few {result['eval/few_shot']:.2%}  ({int(result['eval/images'])} images)")
    lines = [head]
    for name, acc in zip(result["classes"], result["per_class"]):
        lines.append(f"  {name:>20}  -" if math.isnan(acc) else f"  {name:>20}  {acc:.2%}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dynloss evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a checkpoint directory written by pipelines.train")
    p.add_argument("--data", required=True, help="a prepared dataset folder or URI (python -m pipelines.prepare)")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when present)")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size, args.device)
    except ValueError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
