"""Row order of a prepared split: whether its classes come in runs, and the check `shuffle: blocks` needs.

Sources list their images class by class (an image folder, the WebVision and ImageNet-LT file lists, Animal-10N's
file names), and `dynloss prepare` numbers the rows in source order unless asked for a random one
(`--row-order shuffled`). A full shuffle (`data.shuffle: full`) does not care. `shuffle: blocks` does: it puts
whole blocks (about a thousand consecutive rows) in a new order each epoch and keeps the rows of a block together,
so on class-ordered shards every training batch holds one or two classes (measured on 4,000 JPEGs in 10 class
folders: 1.3 distinct labels per batch of 128). `check_block_order` refuses that before a run starts.

    same, chance = label_runs(labels)   # fraction of consecutive rows sharing a label, and that fraction by chance
"""

from __future__ import annotations

import numpy as np

ROW_ORDERS = ("source", "shuffled")


def label_runs(labels: np.ndarray, true_labels: np.ndarray | None = None) -> tuple[float, float]:
    """(fraction of consecutive rows with the same class, the same fraction in a random order: sum of p_k^2).
    The class is the true label where every row has one (noise mixes the given labels of a sorted split), else
    the given label."""
    y = np.asarray(labels if true_labels is None or (np.asarray(true_labels) < 0).any() else true_labels)
    if len(y) < 2:
        return 0.0, 1.0
    p = np.bincount(y - y.min()) / len(y)
    return float(np.mean(y[1:] == y[:-1])), float(np.sum(p * p))


def in_class_runs(same: float, chance: float) -> bool:
    """Consecutive rows share their class far more often than a random order would make them (more than half way
    from chance to always): 0.99 against 0.1 on a class-sorted 10-class split, about chance on a shuffled one."""
    return same > chance + 0.5 * (1.0 - chance)


def check_block_order(root: str, split: str) -> None:
    """Raise if `root/split`'s rows come in class runs (see the module docstring), naming what to do. Uses the
    manifest's `label_runs` (written by `dynloss prepare`), else reads the split's label columns."""
    from dynloss.data.manifest import read_manifest
    from dynloss.data.shards import read_split

    entry = read_manifest(root).get("splits", {}).get(split, {})
    if "label_runs" in entry:
        same, chance = entry["label_runs"]["same"], entry["label_runs"]["chance"]
    else:
        table = read_split(root, split, columns=["label", "true_label"])
        same, chance = label_runs(table["label"].to_numpy(), table["true_label"].to_numpy())
    if in_class_runs(same, chance):
        raise ValueError(
            f"{root}: split {split!r} holds its classes in runs ({same:.0%} of consecutive rows share a class; "
            f"{chance:.0%} in a random order), so shuffle 'blocks' (whole blocks in a new order, rows of a block "
            "together) would train on batches of one or two classes. Use data.shuffle: full (a full shuffle each "
            "epoch), or prepare the data again with `dynloss prepare ... --row-order shuffled` (rows written in a "
            "seeded random order) into a new --out")
