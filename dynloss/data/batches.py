"""From shard rows to training batches, without Ray: id filter, decode + views, corrupt counting, collate.

The Ray Data pipeline (`pipelines/data.py`) runs these same functions inside `map_batches`; this module
also reads a split in-process (`iter_local_batches`, `load_split_numpy`) for the library demo, the
meta set and the benchmark baseline. Shard format: DESIGN.md section 5 and notes/common.md (rows `id`,
`image` bytes, `label`, `true_label`; one directory per split plus `manifest.json`).

Corrupt images are dropped and counted in streaming: every output batch carries a `corrupt` column whose
sum over the batch is the number of images dropped from the input rows it came from (the whole count
sits on the batch's first row). A batch whose images are all corrupt keeps one placeholder row (id -1,
zero pixels) so its count still reaches the consumer; `collate` removes placeholders and sums the
column into one number per batch.

    python -m pipelines.prepare digits --out data/digits
    .venv/bin/python -c "from dynloss.data.batches import load_split_numpy; \
d = load_split_numpy('data/digits', 'train'); print(d['images'].shape, d['corrupt'])"
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from dynloss.data.decode import decode_batch, mode_from_manifest
from dynloss.data.manifest import read_manifest
from dynloss.data.shards import SCHEMA, read_split, shard_paths
from dynloss.data.transforms import TRAIN_VIEWS, Preset, build_preset, make_views

#: columns every shard has: id, image, label, true_label.
SHARD_COLUMNS = tuple(SCHEMA.names)
#: metadata columns passed through to each batch.
META_COLUMNS = ("id", "label", "true_label")
#: id of the placeholder row that carries the count of an all-corrupt batch.
PLACEHOLDER_ID = -1


# ----------------------------------------------------------------------------------------------- storage
def split_locations(root: str, split: str) -> list[str]:
    """The split's shard files as listed in the manifest (absolute for local paths, URIs kept)."""
    root = str(root) if "://" in str(root) else os.path.abspath(os.path.expanduser(str(root)))
    return shard_paths(root, split)


def read_rows(root: str, split: str) -> pa.Table:
    """All rows of a split in id order, in-process (small data, the benchmark baseline)."""
    return read_split(root, split, columns=list(SHARD_COLUMNS))


# --------------------------------------------------------------------------------------------- id filter
def as_id_array(ids, field: str) -> pa.Array | None:
    """Validate an id set (numpy array / list / pyarrow array of ints) into an int64 pyarrow array."""
    if ids is None:
        return None
    arr = np.asarray(ids.to_numpy(zero_copy_only=False) if isinstance(ids, (pa.Array, pa.ChunkedArray)) else ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{field} must be integer row ids (the shard `id` column), got dtype {arr.dtype}")
    return pa.array(arr.reshape(-1).astype(np.int64, copy=False), type=pa.int64())


def filter_ids(table: pa.Table, include_ids: pa.Array | None = None, exclude_ids: pa.Array | None = None) -> pa.Table:
    """Rows whose id is in include_ids (if given) and not in exclude_ids (if given); vectorised."""
    if include_ids is not None:
        table = table.filter(pc.is_in(table["id"], value_set=include_ids))
    if exclude_ids is not None and len(exclude_ids):
        table = table.filter(pc.invert(pc.is_in(table["id"], value_set=exclude_ids)))
    return table


# ------------------------------------------------------------------------------------------ decode + views
def batch_seed(seed: int | None, ids: np.ndarray, *extra: int) -> int:
    """Augmentation seed of one batch: from (seed, extra, the batch's ids), or fresh entropy if seed is None.

    Fresh processes (Ray workers) all start torch's generator from the same constant, so a batch is
    always seeded explicitly, never left to the process state.
    """
    if seed is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> 1)
    digest = zlib.crc32(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(e) & 0xFFFFFFFF for e in extra], digest])
               .generate_state(1, np.uint64)[0] >> 1)


def views_from_rows(rows: pa.Table | Mapping, preset: Preset, train: bool, seed: int | None = None,
                    views: Sequence[str] = TRAIN_VIEWS) -> dict[str, np.ndarray]:
    """Decode the `image` column of shard rows once, make the views, drop and count corrupt images.

    Returns numpy columns id, label, true_label, the train ``views`` (weak + strong by default) or x (eval; views
    uint8, ``preset.normalise`` makes the model's input of them), corrupt.
    """
    meta, images, dropped = _decoded(rows, preset.mode)
    out = dict(meta)
    out.update({k: v.numpy() for k, v in make_views(images, preset, train, seed=batch_seed(seed, out["id"]),
                                                    views=views).items()})
    out["corrupt"] = np.zeros(len(images), dtype=np.int64)
    if len(images):
        out["corrupt"][0] = dropped
    elif dropped:
        out = _placeholder(preset, train, dropped, views)
    return out


def views_on_device(rows: pa.Table | Mapping, preset: Preset, train: bool, device: torch.device | str,
                    seed: int | None = None, views: Sequence[str] = TRAIN_VIEWS) -> dict[str, torch.Tensor]:
    """`views_from_rows` where the batch is consumed: the images decoded on ``device`` (a GPU decodes the JPEGs,
    `dynloss.data.decode.decode_batch`) and their views made there; the batch `collate` would give, views on the
    device (id and labels stay on the CPU), ``corrupt`` already summed. The same seed gives the same views as
    `views_from_rows` on the CPU (config ``data.decode_on: device``)."""
    meta, images, dropped = _decoded(rows, preset.mode, device)
    out = {c: torch.from_numpy(v) for c, v in meta.items()}
    if images:
        out.update(make_views(images, preset, train, seed=batch_seed(seed, meta["id"]), views=views))
    else:
        empty = torch.empty((0, preset.channels, *preset.size), dtype=torch.uint8, device=device)
        out.update({v: empty for v in views} if train else {"x": empty})
    out["corrupt"] = torch.tensor(dropped, dtype=torch.int64)
    return out


def _decoded(rows: pa.Table | Mapping, mode: str, device: torch.device | str | None = None
             ) -> tuple[dict[str, np.ndarray], list[torch.Tensor], int]:
    """The rows' metadata columns and decoded images (on ``device``), corrupt ones dropped; how many were."""
    if isinstance(rows, pa.Table):
        blobs = rows["image"].to_pylist()
        meta = {c: rows[c].to_numpy().astype(np.int64, copy=False) for c in META_COLUMNS}
    else:
        blobs = list(rows["image"])
        meta = {c: np.asarray(rows[c], dtype=np.int64) for c in META_COLUMNS}
    images, ok = decode_batch(blobs, mode, device)
    return {c: meta[c][ok] for c in META_COLUMNS}, images, int(len(blobs) - ok.sum())


def _placeholder(preset: Preset, train: bool, dropped: int, views: Sequence[str]) -> dict[str, np.ndarray]:
    pixels = np.zeros((1, preset.channels, *preset.size), dtype=np.uint8)
    out = {c: np.full(1, PLACEHOLDER_ID, dtype=np.int64) for c in META_COLUMNS}
    out.update({v: pixels.copy() for v in views} if train else {"x": pixels})
    out["corrupt"] = np.array([dropped], dtype=np.int64)
    return out


def collate(batch: Mapping[str, np.ndarray], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Numpy batch -> tensors; placeholder rows removed, `corrupt` summed into a 0-dim int64 tensor.

    A column is shared, not copied, when no row is dropped and the array is writable (fresh from the decode, or
    concatenated by Ray's batcher): a 256-row batch of 224-px views is 39 MB. A read-only array (Ray's zero-copy
    view of the object store's shared memory, which torch must not alias) is copied."""
    keep = np.asarray(batch["id"]) != PLACEHOLDER_ID
    whole = bool(keep.all())
    out = {k: torch.as_tensor(_kept(np.asarray(v), keep, whole)) for k, v in batch.items() if k != "corrupt"}
    out["corrupt"] = torch.tensor(int(np.asarray(batch["corrupt"]).sum()), dtype=torch.int64)
    if device is not None:
        out = {k: v.to(device, non_blocking=True) for k, v in out.items()}
    return out


def _kept(arr: np.ndarray, keep: np.ndarray, whole: bool) -> np.ndarray:
    return arr if whole and arr.flags.writeable else arr[keep]  # boolean indexing copies


def resolve_preset(preset: str | Preset, root: str | None = None, mode: str | None = None, **params) -> Preset:
    """A Preset from a name (decode mode from the manifest's image.mode unless given) or as is."""
    if isinstance(preset, Preset):
        return preset
    if mode is None and root is not None:
        mode = mode_from_manifest(read_manifest(root))
    return build_preset(preset, mode=mode, **params)


# ---------------------------------------------------------------------------------- in-process reading
def iter_local_batches(root: str, split: str, preset: str | Preset, *, train: bool = True, batch_size: int = 256,
                       seed: int = 0, epoch: int = 0, include_ids=None, exclude_ids=None, shuffle: bool = True,
                       device: torch.device | str | None = None, table: pa.Table | None = None,
                       views: Sequence[str] = TRAIN_VIEWS, decode_device: torch.device | str | None = None,
                       **preset_params) -> Iterator[dict[str, torch.Tensor]]:
    """Single-process batches with the same keys as the Ray path (id, label, true_label, the train ``views`` or x,
    corrupt); order and augmentation seeded by (seed, epoch). `table` reuses an already read split. decode_device:
    decode and make the views there (`views_on_device`: a GPU decodes the JPEGs), the same views on the CPU."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    preset = resolve_preset(preset, root, **preset_params)
    table = read_rows(root, split) if table is None else table
    table = filter_ids(table, as_id_array(include_ids, "include_ids"), as_id_array(exclude_ids, "exclude_ids"))
    order = np.arange(len(table))
    if shuffle:
        order = np.random.default_rng(None if seed is None else [int(seed), int(epoch)]).permutation(len(table))
    aug_seed = None if seed is None else batch_seed(seed, np.zeros(0, np.int64), epoch)
    decode = {"preset": preset, "train": train, "seed": aug_seed, "views": views}
    for chunk in rows_in_order(table, order, batch_size):
        if decode_device is not None:
            yield views_on_device(chunk, device=decode_device, **decode)
        else:
            yield collate(views_from_rows(chunk, **decode), device)


def rows_in_order(table: pa.Table, order: np.ndarray, rows: int) -> Iterator[pa.Table]:
    """The table's rows taken in ``order``, ``rows`` at a time: the decode calls of the plain loop and of a held
    split's Ray decode task (`pipelines.data`)."""
    for start in range(0, len(order), rows):
        yield table.take(pa.array(order[start:start + rows]))


def load_split_numpy(root: str, split: str, *, mode: str | None = None, include_ids=None, exclude_ids=None) -> dict:
    """A split decoded in memory: id, label, true_label (int64 [N]), images (uint8 [N,C,H,W]), corrupt (int).

    For small array sources (digits, (Fashion-)MNIST, CIFAR); images of different sizes raise a
    ValueError (use iter_local_batches with a resizing preset instead).
    """
    manifest = read_manifest(root)
    mode = mode or mode_from_manifest(manifest)
    table = filter_ids(read_rows(root, split), as_id_array(include_ids, "include_ids"),
                       as_id_array(exclude_ids, "exclude_ids"))
    images, ok = decode_batch(table["image"].to_pylist(), mode)
    out = {c: table[c].to_numpy().astype(np.int64, copy=False)[ok] for c in META_COLUMNS}
    shapes = sorted({tuple(i.shape) for i in images})
    if len(shapes) > 1:
        raise ValueError(f"{root}/{split}: images have different shapes {shapes[:5]}; load_split_numpy needs one "
                         "size, iterate with iter_local_batches and a resizing preset instead")
    out["images"] = torch.stack(images).numpy() if images else np.zeros((0, 1 if mode == "L" else 3, 0, 0), np.uint8)
    out["corrupt"] = int(len(ok) - ok.sum())
    return out
