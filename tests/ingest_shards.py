"""Test helper (not a test module): write real shards in the dynloss format from scikit-learn digits.

Format: notes/common.md "Shard rows" / DESIGN.md section 5: ROOT/<split>/part-0000k.parquet with
id int64 (dense), image binary (PNG/JPEG bytes made with Pillow), label int64, true_label int64, and
ROOT/manifest.json listing the shards. Used by tests/test_decode_transforms.py and tests/test_ingest.py,
and to make benchmark data:

    .venv/bin/python -c "import sys; sys.path.insert(0, 'tests'); from ingest_shards import write_digits; \
write_digits('/tmp/digits_shards', n_shards=4)"
"""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SCHEMA = pa.schema([("id", pa.int64()), ("image", pa.binary()), ("label", pa.int64()), ("true_label", pa.int64())])


def digits(n: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 8, 8] on the 0-255 scale, labels int64 [N]) from sklearn's bundled digits."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * 255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    return (images, labels) if n is None else (images[:n], labels[:n])


def encode(image: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_split(root: str, split: str, blobs: list[bytes], labels: np.ndarray, n_shards: int = 2,
                true_labels: np.ndarray | None = None) -> dict:
    """Write one split as n_shards parquet files; returns its manifest entry."""
    os.makedirs(os.path.join(root, split), exist_ok=True)
    n = len(blobs)
    true_labels = labels if true_labels is None else true_labels
    shards = []
    for k, idx in enumerate(np.array_split(np.arange(n), n_shards)):
        rel = f"{split}/part-{k:05d}.parquet"
        table = pa.table({"id": idx.astype(np.int64), "image": [blobs[i] for i in idx],
                          "label": labels[idx], "true_label": true_labels[idx]}, schema=SCHEMA)
        path = os.path.join(root, rel)
        pq.write_table(table, path, row_group_size=64)
        with open(path, "rb") as f:
            data = f.read()
        shards.append({"path": rel, "rows": len(idx), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    return {"rows": n, "bytes": sum(s["bytes"] for s in shards),
            "counts": np.bincount(labels, minlength=10).tolist(), "shards": shards}


def write_manifest(root: str, splits: dict, mode: str = "L", size=(8, 8)) -> None:
    manifest = {"format": "dynloss-shards/1", "source": "digits", "classes": [str(c) for c in range(10)],
                "num_classes": 10, "splits": splits, "image": {"mode": mode, "size": list(size)},
                "noise": {"kind": "none"}, "imbalance": None, "seed": 0, "command": "tests/ingest_shards.py"}
    with open(os.path.join(root, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def write_digits(root: str, n: int | None = None, n_shards: int = 2, corrupt_ids=(), fmt: str = "PNG",
                 splits=("train",)) -> tuple[np.ndarray, np.ndarray]:
    """Digits as shards under root (each split gets the same rows); rows in corrupt_ids get truncated bytes.

    Returns (images, labels) as written (before corruption).
    """
    images, labels = digits(n)
    blobs = [encode(img, fmt) for img in images]
    for i in corrupt_ids:
        blobs[i] = blobs[i][: len(blobs[i]) // 2]  # truncated file: a real-world corrupt download
    write_manifest(root, {s: write_split(root, s, blobs, labels, n_shards) for s in splits})
    return images, labels
