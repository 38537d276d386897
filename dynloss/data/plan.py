"""The prepare plan: which rows a split keeps, with which labels, in which shard.

Order of operations for the train split (other splits keep every row and their labels):
  1. imbalance: `dynloss.noise.make_long_tailed` on the clean labels (given labels when the truth is unknown);
  2. noise: `dynloss.noise.add_label_noise` on the kept clean labels, the clean label kept in `true_label`;
  3. scan (file sources): every listed file is read and checked with Pillow; missing or unreadable files
     are left out and reported (or fail the run with strict=True);
  4. ids 0..N-1 over the accepted rows in source order, cut into shards of about `shard_bytes` each.
Every step is deterministic given the source and the settings, so a re-run plans the same shards. The plan
is saved (`_state/plan-<split>.parquet`, then `_plan.json`) before any shard is written; a re-run with the
same source listing and settings reuses it without scanning again. Files are read twice (scan, then shard
write): the ids must be dense over the accepted rows before any shard can be written.

    python -m pipelines.prepare digits --out /tmp/dl_digits --imbalance 0.1 --noise sym:0.4   # writes /tmp/dl_digits/_plan.json
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynloss.data import storage
from dynloss.data.shards import encode_png
from dynloss.data.sources.base import SplitData

VERIFY_LEVELS = ("decode", "header", "none")


@dataclass
class SplitPlan:
    name: str
    kind: str  # "array" or "file"
    src: np.ndarray  # source row of each id
    labels: np.ndarray
    true_labels: np.ndarray
    nbytes: np.ndarray  # encoded size per row (exact for files, estimated for arrays)
    bounds: list[tuple[int, int]] = field(default_factory=list)  # [start, stop) ids of each shard
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (location, reason)
    row_order: str = "source"  # "shuffled": ids numbered over a seeded permutation (`dynloss.data.order`)

    @property
    def rows(self) -> int:
        return len(self.src)


def apply_protocols(split: SplitData, num_classes: int, dataset: str, imbalance: float | None, profile: str,
                    noise: tuple[str, float], convention: str, seed: int):
    """(kept source rows, labels, true labels) after the long-tail and noise protocols."""
    clean_known = bool((split.true_labels >= 0).all())
    basis = split.true_labels if clean_known else split.labels
    if imbalance is not None and imbalance < 1.0:
        from dynloss.noise import make_long_tailed

        keep = np.asarray(make_long_tailed(basis, imbalance, profile=profile, seed=seed), dtype=np.int64)
    else:
        keep = np.arange(len(split), dtype=np.int64)
    labels, truth = split.labels[keep].copy(), split.true_labels[keep].copy()
    kind, rate = noise
    if kind != "none":
        from dynloss.noise import add_label_noise

        clean = truth if clean_known else labels
        labels = np.asarray(
            add_label_noise(clean, kind, rate, num_classes, convention=convention, dataset=dataset, seed=seed),
            dtype=np.int64,
        )
    return keep, labels, truth


def image_problem(data: bytes, verify: str) -> str | None:
    """Why Pillow can't use these bytes, or None. 'decode' decodes fully (JPEGs at 1/8 scale, which still
    reads every byte, so truncation shows); 'header' runs Image.verify(); 'none' checks nothing."""
    if not data:
        return "empty file"
    if verify == "none":
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        if verify == "decode":
            with Image.open(io.BytesIO(data)) as im:
                im.draft(None, (1, 1))
                im.load()
    except Image.UnidentifiedImageError:  # its message names the in-memory stream, which tells the reader nothing
        return "unreadable: not an image (Pillow cannot identify its format)"
    except Exception as e:  # noqa: BLE001  Pillow raises OSError, SyntaxError, ValueError, struct.error ... for bad files
        return f"unreadable: {_OBJECT_REPR.sub('', str(e)).strip() or type(e).__name__}"
    return None


_OBJECT_REPR = re.compile(r"\s*<[^<>]*\bobject at 0x[0-9a-fA-F]+>")  # "<_io.BytesIO object at 0x7f...>"


def scan_files(base: str, paths: list[str], verify: str, strict: bool) -> list[tuple[int, str | None]]:
    """(bytes, problem) per file; a scan job. strict=True raises at the first bad file, naming it."""
    fs, root = storage.resolve(base)
    out = []
    for rel in paths:
        path = storage.join(root, rel)
        info = fs.get_file_info(path)
        if info.type != storage.pafs.FileType.File:
            size, problem = 0, "missing"
        elif verify == "none":
            size, problem = int(info.size), ("empty file" if not info.size else None)
        else:
            try:
                data = storage.read_bytes(fs, path)
                size, problem = len(data), image_problem(data, verify)
            except OSError as e:
                size, problem = 0, f"unreadable: {e}"
        if problem and strict:
            raise ValueError(f"{storage.display(base, rel)}: {problem} (--strict stops at the first bad file)")
        out.append((size, problem))
    return out


def estimate_png_bytes(images: np.ndarray, rows: np.ndarray, samples: int = 64) -> int:
    """Mean PNG size of `images[rows]` over evenly spaced rows (deterministic), to size array shards
    without encoding everything twice."""
    if len(rows) == 0:
        return 1
    pick = np.unique(np.linspace(0, len(rows) - 1, num=min(samples, len(rows))).astype(int))
    return max(1, int(np.mean([len(encode_png(images[rows[i]])) for i in pick])))


def shard_bounds(nbytes: np.ndarray, target_bytes: int) -> list[tuple[int, int]]:
    """Cut rows in order into shards of at most target_bytes (a single larger row gets its own shard)."""
    bounds, start, total = [], 0, 0
    for i, b in enumerate(np.asarray(nbytes, dtype=np.int64).tolist()):
        if i > start and total + b > target_bytes:
            bounds.append((start, i))
            start, total = i, 0
        total += b
    if len(nbytes):
        bounds.append((start, len(nbytes)))
    return bounds


PLAN_FILE = "_plan.json"


def _plan_table(out_root: str, name: str) -> str:
    return storage.join(out_root, "_state", f"plan-{name}.parquet")


def save_plans(location: str, plans: dict[str, SplitPlan], fingerprint: str, settings: dict) -> None:
    """Persist the plan (row tables under _state/, then _plan.json last) so a re-run skips the scan."""
    fs, root = storage.resolve(location)
    for name, p in plans.items():
        table = pa.table({"src": p.src, "label": p.labels, "true_label": p.true_labels, "nbytes": p.nbytes})
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        storage.write_atomic(fs, _plan_table(root, name), buf.getvalue().to_pybytes())
    doc = {
        "fingerprint": fingerprint,
        "settings": settings,
        "splits": {
            n: {"kind": p.kind, "rows": p.rows, "bounds": p.bounds, "rejected": [list(r) for r in p.rejected],
                "row_order": p.row_order}
            for n, p in plans.items()
        },
    }
    storage.write_atomic(fs, storage.join(root, PLAN_FILE), json.dumps(doc, indent=1).encode())


def read_plan_doc(location: str) -> dict | None:
    fs, root = storage.resolve(location)
    path = storage.join(root, PLAN_FILE)
    return json.loads(storage.read_bytes(fs, path)) if storage.is_file(fs, path) else None


def load_plans(location: str, doc: dict) -> dict[str, SplitPlan]:
    fs, root = storage.resolve(location)
    plans = {}
    for name, s in doc["splits"].items():
        t = pq.read_table(_plan_table(root, name), filesystem=fs)
        col = {c: t.column(c).to_numpy().astype(np.int64) for c in t.column_names}
        plans[name] = SplitPlan(name, s["kind"], col["src"], col["label"], col["true_label"], col["nbytes"],
                                [tuple(b) for b in s["bounds"]], [tuple(r) for r in s["rejected"]],
                                s.get("row_order", "source"))
    return plans
