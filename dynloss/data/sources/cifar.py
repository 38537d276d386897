"""CIFAR-10 / CIFAR-100 "python version" batches (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

`--root` is the folder holding `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) or
`cifar-100-python/` (train, test, meta), or that folder itself. Each batch is a pickled dict with
b"data" (N x 3072 uint8, red then green then blue planes of 32x32, row-major) and b"labels"
(CIFAR-10) or b"fine_labels" (CIFAR-100). Loaded with the restricted unpickler in `safe_pickle`.

    python -m pipelines.prepare cifar10 --root ~/data --out /tmp/dl_cifar10 --imbalance 0.01 --noise sym:0.4
"""

from __future__ import annotations

import numpy as np

from dynloss.data import storage
from dynloss.data.sources.base import Source, SplitData, check_labels
from dynloss.data.sources.safe_pickle import loads

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

_LAYOUT = {
    # name: (folder, {split: [batch files]}, label key, meta file, names key, num classes)
    "cifar10": (
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
        b"labels",
        "batches.meta",
        b"label_names",
        10,
    ),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, b"fine_labels", "meta", b"fine_label_names", 100),
}


def _folder(fs, root: str, location: str, folder: str, first: str) -> tuple[str, str]:
    for path, shown in ((storage.join(root, folder), storage.display(location, folder)), (root, location)):
        if storage.is_file(fs, storage.join(path, first)):
            return path, shown
    raise ValueError(
        f"{location}: no CIFAR batches found; --root should hold {folder}/ (or be it), with {first} and the other "
        "batches of the python version from https://www.cs.toronto.edu/~kriz/cifar.html"
    )


def _batch(fs, path: str, shown: str, label_key: bytes, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    d = loads(storage.read_bytes(fs, path), shown)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(d) if isinstance(d, dict) else type(d).__name__
        raise ValueError(f"{shown}: expected a dict with b'data' and {label_key!r}, found {keys}")
    data = np.asarray(d[b"data"], dtype=np.uint8)
    labels = check_labels(np.asarray(d[label_key]), num_classes, shown)
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(f"{shown}: b'data' has shape {data.shape}, expected ({len(labels)}, 3072)")
    # planes R, G, B of 32x32 -> N x 32 x 32 x 3
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels


def read_cifar(name: str, root: str, **_) -> Source:
    folder, files, label_key, meta, names_key, num_classes = _LAYOUT[name]
    fs, base = storage.resolve(root)
    base, shown = _folder(fs, base, str(root), folder, files["test"][0])
    classes = [str(i) for i in range(num_classes)] if name == "cifar100" else list(CIFAR10_CLASSES)
    if storage.is_file(fs, storage.join(base, meta)):
        m = loads(storage.read_bytes(fs, storage.join(base, meta)), storage.display(shown, meta))
        if isinstance(m, dict) and len(m.get(names_key, [])) == num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in m[names_key]]
    for split, batches in files.items():  # all present before reading any: a partial download fails at once
        for b in batches:
            if not storage.is_file(fs, storage.join(base, b)):
                raise ValueError(f"{storage.display(shown, b)} not found: the {name} {split} split needs {', '.join(batches)}")
    splits = {}
    for split, batches in files.items():
        parts = [_batch(fs, storage.join(base, b), storage.display(shown, b), label_key, num_classes) for b in batches]
        labels = np.concatenate([p[1] for p in parts])
        splits[split] = SplitData(labels=labels, true_labels=labels.copy(), images=np.concatenate([p[0] for p in parts]))
    return Source(name, classes, splits, image_mode="RGB", image_size=[32, 32], encoding="png")
