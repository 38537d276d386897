"""The shard format: parquet files of (id, image, label, true_label), written one shard per job.

Layout under OUT (a local path or a pyarrow filesystem URI), see DESIGN.md section 5 "Shards":
  OUT/<split>/part-00000.parquet ...   rows: id int64 (dense 0..N-1 per split, source order),
                                       image binary (PNG for array sources, original file bytes otherwise),
                                       label int64 (given, maybe noisy), true_label int64 (-1 unknown)
  OUT/manifest.json                    written last (dynloss.data.manifest)
  OUT/_state/<split>/part-00000.json   receipt of a finished shard (rows, bytes, sha256), used to resume
Row groups hold at most 1000 rows or about 16 MB, so a reader streams a shard without loading it whole;
`id`/`label` statistics are written so an id filter can skip row groups.

    python -c "from dynloss.data import read_split; print(read_split('/tmp/dl_digits', 'train').num_rows)"
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dynloss.data import storage

SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("true_label", pa.int64(), nullable=False),
    ]
)
ROW_GROUP_ROWS = 1000
ROW_GROUP_BYTES = 16 << 20
STATE_DIR = "_state"
# Encoded images don't compress further; the small integer columns do.
_WRITE_OPTIONS = {
    "compression": {"id": "zstd", "image": "none", "label": "zstd", "true_label": "zstd"},
    "use_dictionary": ["label", "true_label"],
    "write_statistics": ["id", "label", "true_label"],
}


def shard_name(split: str, index: int) -> str:
    return f"{split}/part-{index:05d}.parquet"


def receipt_name(split: str, index: int) -> str:
    return f"{STATE_DIR}/{split}/part-{index:05d}.json"


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG of an (H,W) grayscale or (H,W,3) RGB uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class ShardJob:
    """Everything one worker needs to write one shard (picklable, for processes and Ray tasks)."""

    out: str
    split: str
    index: int
    start: int  # id of the first row; ids are start..start+rows-1
    labels: np.ndarray
    true_labels: np.ndarray
    fingerprint: str  # of the plan; a receipt from another plan is not reused
    images: np.ndarray | None = None
    base: str | None = None
    paths: list[str] | None = None

    @property
    def rows(self) -> int:
        return len(self.labels)


def _image_bytes(job: ShardJob) -> list[bytes]:
    if job.images is not None:
        return [encode_png(im) for im in job.images]
    fs, base = storage.resolve(job.base)
    out = []
    for rel in job.paths:
        try:
            out.append(storage.read_bytes(fs, storage.join(base, rel)))
        except OSError as e:
            raise ValueError(
                f"{storage.display(job.base, rel)}: unreadable while writing {shard_name(job.split, job.index)} ({e}); "
                "it passed the scan, so it changed since: delete OUT/_plan.json to scan again"
            ) from e
    return out


def encode_table(job: ShardJob) -> bytes:
    """The parquet bytes of one shard (deterministic for the same rows and library versions)."""
    images = _image_bytes(job)
    table = pa.table(
        {
            "id": np.arange(job.start, job.start + job.rows, dtype=np.int64),
            "image": pa.array(images, type=pa.binary()),
            "label": np.asarray(job.labels, dtype=np.int64),
            "true_label": np.asarray(job.true_labels, dtype=np.int64),
        },
        schema=SCHEMA,
    )
    mean = max(1, sum(map(len, images)) // max(1, job.rows))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, row_group_size=max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // mean)), **_WRITE_OPTIONS)
    return buf.getvalue().to_pybytes()


def write_shard(job: ShardJob) -> dict:
    """Write one shard atomically, then its receipt; return the receipt."""
    data = encode_table(job)
    fs, out = storage.resolve(job.out)
    receipt = {
        "path": shard_name(job.split, job.index),
        "rows": job.rows,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "first_id": job.start,
        "fingerprint": job.fingerprint,
    }
    storage.write_atomic(fs, storage.join(out, receipt["path"]), data)
    storage.write_atomic(fs, storage.join(out, receipt_name(job.split, job.index)), json.dumps(receipt).encode())
    return receipt


def sha256_file(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def finished_receipt(out: str, split: str, index: int, rows: int, fingerprint: str) -> dict | None:
    """The receipt of a shard already written by this plan, or None when it must be (re)written.

    Kept only if the receipt exists, belongs to this plan, has the planned row count and the file on disk
    still hashes to the receipt's sha256.
    """
    fs, root = storage.resolve(out)
    rpath = storage.join(root, receipt_name(split, index))
    if not storage.is_file(fs, rpath):
        return None
    try:
        receipt = json.loads(storage.read_bytes(fs, rpath))
    except ValueError:
        return None
    spath = storage.join(root, shard_name(split, index))
    ok = (
        receipt.get("fingerprint") == fingerprint
        and receipt.get("rows") == rows
        and storage.is_file(fs, spath)
        and fs.get_file_info(spath).size == receipt.get("bytes")
        and sha256_file(fs, spath) == receipt.get("sha256")
    )
    return receipt if ok else None


def ensure_shard(job: ShardJob) -> dict:
    """A shard job: keep the shard if this plan already finished it (checksum verified), else write it."""
    receipt = finished_receipt(job.out, job.split, job.index, job.rows, job.fingerprint)
    if receipt is not None:
        return dict(receipt, kept=True)
    return dict(write_shard(job), kept=False)


def _split_entry(location: str, manifest: dict, split: str) -> dict:
    if split not in manifest["splits"]:
        raise ValueError(f"{location}: no split {split!r}; the manifest has {', '.join(manifest['splits'])}")
    return manifest["splits"][split]


def shard_problems(location: str, manifest: dict, splits, verify: bool = False) -> list[str]:
    """What is wrong with the shards of ``splits`` against the manifest: a missing file, a size that differs
    (a truncated or replaced shard), with ``verify`` a sha256 that differs. Stat calls only without ``verify``."""
    fs, root = storage.resolve(location)
    redo = manifest.get("command") or "dynloss prepare ... (the manifest's command)"
    out = []
    for split in splits:
        for shard in _split_entry(location, manifest, split).get("shards", []):
            path, shown = storage.join(root, shard["path"]), storage.display(str(location).rstrip("/"), shard["path"])
            info = fs.get_file_info(path)
            if info.type != storage.pafs.FileType.File:
                problem = "is missing"
            elif shard.get("bytes") is not None and info.size != shard["bytes"]:
                problem = f"is {info.size} bytes, the manifest says {shard['bytes']} (truncated or replaced)"
            elif verify and shard.get("sha256") and sha256_file(fs, path) != shard["sha256"]:
                problem = "does not match its sha256 in the manifest (changed since it was prepared)"
            else:
                continue
            out.append(f"{shown} {problem}; rerun `{redo}` to write it again")
    return out


def shard_paths(location: str, split: str) -> list[str]:
    """Locations (same style as `location`: path or URI) of a split's shards, in id order (for ray.data.read_parquet)."""
    from dynloss.data.manifest import read_manifest

    entry = _split_entry(location, read_manifest(location), split)
    return [storage.display(str(location).rstrip("/"), s["path"]) for s in entry["shards"]]


def read_split(location: str, split: str, columns: list[str] | None = None, verify: bool = False) -> pa.Table:
    """All shards of `split` under the prepared folder `location` as one table, rows in id order (no Ray needed).

    verify=True first checks every shard's sha256 against the manifest.
    """
    from dynloss.data.manifest import read_manifest

    entry = _split_entry(location, read_manifest(location), split)
    fs, root = storage.resolve(location)
    tables = []
    for shard in entry["shards"]:
        path = storage.join(root, shard["path"])
        if verify and sha256_file(fs, path) != shard["sha256"]:
            raise ValueError(f"{storage.display(location, shard['path'])}: sha256 differs from the manifest; prepare again")
        tables.append(pq.read_table(path, filesystem=fs, columns=columns))
    return pa.concat_tables(tables) if tables else SCHEMA.empty_table().select(columns or SCHEMA.names)
