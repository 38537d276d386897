"""The dataset manifest (`OUT/manifest.json`): what a prepared folder holds and how it was made.

Keys (DESIGN.md section 5, notes/common.md): format, source, root, classes, num_classes, image {mode, size,
encoding}, splits {name: {rows, bytes, counts (per given label), true_counts, noise_rate, rejected, row_order
("source" or "shuffled"), label_runs {same, chance} (dynloss.data.order), shards [{path, rows, bytes, sha256,
first_id}]}}, noise {kind, rate, convention, dataset, split, seed,
actual_rate, noisy_rows, rows_known, summary (dynloss.noise.noise_summary of the train rows)},
imbalance {rho, profile, split, applied, counts_before, counts_after}, seed, totals {rows, bytes, shards,
rejected}, rejected_file, settings, fingerprint, kept_shards, command, argv, version, created.
It is written last, so a folder with a manifest is complete.

    python -c "from dynloss.data import read_manifest; print(read_manifest('/tmp/dl_digits')['totals'])"
"""

from __future__ import annotations

import json
import re

import numpy as np

from dynloss.data import storage
from dynloss.data.order import label_runs

FORMAT = "dynloss-shards/1"
MANIFEST = "manifest.json"


def read_manifest(location: str) -> dict:
    """The manifest of a prepared folder (path or URI), or of a manifest.json given directly."""
    location = str(location)
    fs, path = storage.resolve(location)
    if not path.endswith(".json"):
        path = storage.join(path, MANIFEST)
    if not storage.is_file(fs, path):
        raise ValueError(
            f"no {MANIFEST} in {location}: prepare it with `python -m pipelines.prepare SOURCE --out {location}`; "
            "the manifest is written last, so an interrupted prepare has none (run the same command again to finish it)"
        )
    return json.loads(storage.read_bytes(fs, path))


def counts(labels: np.ndarray, num_classes: int) -> list[int]:
    labels = np.asarray(labels)
    return np.bincount(labels[labels >= 0], minlength=num_classes).tolist()


def noise_stats(given: np.ndarray, true: np.ndarray, num_classes: int) -> dict | None:
    """`dynloss.noise.noise_summary` over the rows whose clean label is known; None when none is."""
    from dynloss.noise import noise_summary

    if not (np.asarray(true) >= 0).any():
        return None
    return _jsonable(noise_summary(np.asarray(given), np.asarray(true), num_classes))


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if hasattr(x, "tolist"):  # torch tensors
        return _jsonable(x.tolist())
    return x


def dumps(obj) -> str:
    """Indented JSON with lists of scalars kept on one line (per-class counts of 1000 classes stay readable)."""
    text = json.dumps(_jsonable(obj), indent=1)
    # innermost lists only; JSON strings hold no raw newline, so the whitespace touched is never inside one
    return re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]", text)


def write_manifest(location: str, manifest: dict) -> None:
    fs, path = storage.resolve(location)
    data = dumps(manifest).encode()
    storage.write_atomic(fs, storage.join(path, MANIFEST), data)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dynloss")
    except PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def build_manifest(source, plans: dict, receipts: dict[str, list[dict]], settings: dict, argv: list[str]) -> dict:
    """The manifest for a finished prepare (`plans` from dynloss.data.plan, one receipt per shard)."""
    import datetime
    import shlex

    import PIL
    import pyarrow

    c = source.num_classes
    splits = {}
    for name, p in plans.items():
        shards = [{k: r[k] for k in ("path", "rows", "bytes", "sha256", "first_id")} for r in receipts[name]]
        known = p.true_labels >= 0
        stats = noise_stats(p.labels, p.true_labels, c)
        splits[name] = {
            "rows": p.rows,
            "bytes": sum(s["bytes"] for s in shards),
            "counts": counts(p.labels, c),
            "true_counts": counts(p.true_labels, c) if known.any() else None,
            "noise_rate": stats and stats["rate"],
            "rejected": len(p.rejected),
            "row_order": p.row_order,
            "label_runs": dict(zip(("same", "chance"), label_runs(p.labels, p.true_labels))),
            "shards": shards,
        }
    kind, rate = settings["noise"]
    train = plans.get("train")
    noise = {"kind": kind, "rate": rate, "convention": settings["noise_convention"], "dataset": source.name,
             "split": "train", "seed": settings["seed"]}
    if train is not None:
        stats = noise_stats(train.labels, train.true_labels, c)
        noise.update(actual_rate=stats and stats["rate"], noisy_rows=stats and stats["flipped"],
                     rows_known=stats["n"] if stats else 0, summary=stats)
    rho = settings["imbalance"]
    imbalance = {"rho": rho, "profile": settings["imbalance_profile"], "split": "train",
                 "applied": rho is not None and rho < 1.0}
    if train is not None and "train" in source.splits:
        full = source.splits["train"]
        basis = full.true_labels if (full.true_labels >= 0).all() else full.labels
        kept = train.true_labels if (train.true_labels >= 0).all() else train.labels
        imbalance.update(counts_before=counts(basis, c), counts_after=counts(kept, c))
    return {
        "format": FORMAT,
        "source": source.name,
        "root": settings["root"],
        "classes": list(source.classes),
        "num_classes": c,
        "image": {"mode": source.image_mode, "size": source.image_size, "encoding": source.encoding},
        "splits": splits,
        "noise": noise,
        "imbalance": imbalance,
        "seed": settings["seed"],
        "totals": {
            "rows": sum(s["rows"] for s in splits.values()),
            "bytes": sum(s["bytes"] for s in splits.values()),
            "shards": sum(len(s["shards"]) for s in splits.values()),
            "rejected": sum(s["rejected"] for s in splits.values()),
        },
        "rejected_file": "rejected.csv",
        "settings": settings,
        "source_info": source.info,
        "command": shlex.join(["python", "-m", "pipelines.prepare", *argv]),
        "argv": list(argv),
        "version": {"dynloss": _version(), "pyarrow": pyarrow.__version__, "pillow": PIL.__version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
