"""Ray Data input pipeline: parquet shards -> id filter -> shuffle -> decode + weak/strong views -> train workers.

DESIGN.md section 5, "Ingest". `build_dataset` declares the pipeline on the driver; each Ray Train worker
reads its part with `iter_train_batches(ray.train.get_dataset_shard("train"), ...)`:

    ds = build_dataset("data/fmnist", "train", preset="fashion-mnist", exclude_ids=meta_ids, seed=0)
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)          # Ray Train splits it per worker
    # in loop(), every epoch:
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), batch_size=128, epoch=epoch):
        batch["weak"], batch["strong"], batch["label"], batch["id"]   # tensors on the worker's device
        batch["corrupt"]                                               # 0-dim: images dropped in this batch

- Shards: `ray.data.read_parquet` (the V1 datasource: see `_read_shards`) over the split's shards listed in
  ROOT/manifest.json (local path or pyarrow URI, s3://, gs://).
- Filter: `include_ids` / `exclude_ids` (the per-epoch meta set in or out) as a numpy array, applied with
  `pyarrow.compute.is_in` per block, or as a `SharedIds` whose content may change between epochs
  without rebuilding the dataset (the dataset handed to a TorchTrainer cannot be replaced).
- Order: a new one every epoch, reproducible from `seed`: a full `random_shuffle` of the encoded rows
  (default; shards may be written class by class) or `randomize_block_order` (+ an optional local
  shuffle buffer at iteration) for very large data, both with RandomSeedConfig(reseed_after_execution).
- Decode + augment: one `map_batches` decodes each image once and makes the views asked for (a stream that
  trains on the weak view skips the strong one; `dynloss.data.batches.views_from_rows`); a corrupt image is
  dropped and counted in the `corrupt` column (see that module), which `iter_train_batches` sums per batch.

CPU: the decode tasks take `num_cpus` each (default 1) and Ray Data runs as many as fit; on a small
machine pass `concurrency=1` (or a fractional `num_cpus`) so the train workers keep their share.

    .venv/bin/python -c "from pipelines.ray_runtime import init_ray; from pipelines.data import build_dataset; \
init_ray(num_cpus=2); print(build_dataset('data/digits', 'test', preset='digits', train=False).count())"
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import ray
import ray.data
import torch
from ray.data import RandomSeedConfig
from ray.data.collate_fn import NumpyBatchCollateFn

from dynloss.data.batches import (
    SHARD_COLUMNS,
    as_id_array,
    collate,
    filter_ids,
    iter_local_batches,
    load_split_numpy,
    resolve_preset,
    split_locations,
    views_from_rows,
)
from dynloss.data.transforms import TRAIN_VIEWS, Preset

__all__ = [
    "SHUFFLES",
    "CountingCollate",
    "SharedIds",
    "build_dataset",
    "iter_local_batches",
    "iter_torch_batches_with_counts",
    "iter_train_batches",
    "load_split_numpy",
]

SHUFFLES = ("full", "blocks", "none")


# --------------------------------------------------------------------------------------- ids that change
@ray.remote(num_cpus=0)
class _IdStore:
    def __init__(self) -> None:
        self.version, self.ids = 0, np.zeros(0, dtype=np.int64)

    def set(self, ids: np.ndarray) -> int:
        self.version, self.ids = self.version + 1, ids
        return self.version

    def get(self, known_version: int = -1):
        return self.version, (None if known_version == self.version else self.ids)


# Per process: actor id -> (version, ids as a pyarrow array), so a filter task asks the store only
# "changed since version v?" and receives the ids once per change.
_ID_CACHE: dict[str, tuple[int, pa.Array]] = {}


class SharedIds:
    """A set of row ids held by a small Ray actor; `set` it before an epoch, the dataset filters by it.

        meta = SharedIds(); ds = build_dataset(root, "train", preset="cifar", exclude_ids=meta)
        meta.set(meta_ids)   # every epoch, before that epoch's iteration starts (e.g. on rank 0 + barrier)
    """

    def __init__(self, ids=None, *, name: str | None = None) -> None:
        opts = {"name": name, "get_if_exists": True} if name else {}
        self._store = _IdStore.options(**opts).remote()
        self._key = uuid.uuid4().hex  # identifies this store in the per-process cache
        if ids is not None:
            self.set(ids)

    def set(self, ids) -> int:
        """Replace the ids; returns the new version."""
        return ray.get(self._store.set.remote(np.asarray(as_id_array(ids, "SharedIds.set").to_numpy())))

    def get(self) -> np.ndarray:
        return ray.get(self._store.get.remote())[1]

    def current(self) -> pa.Array:
        """The ids now, cached in this process until they change (one small RPC per call)."""
        version, cached = _ID_CACHE.get(self._key, (-1, None))
        new_version, ids = ray.get(self._store.get.remote(version))
        if ids is not None:
            cached = pa.array(ids, type=pa.int64())
            _ID_CACHE[self._key] = (new_version, cached)
        return cached


def _ids_now(ids) -> pa.Array | None:
    return ids.current() if isinstance(ids, SharedIds) else ids


def _filter_block(table: pa.Table, include_ids=None, exclude_ids=None) -> pa.Table:
    return filter_ids(table, _ids_now(include_ids), _ids_now(exclude_ids))


# ------------------------------------------------------------------------------------------- the dataset
def _read_shards(files: list[str], file_order) -> ray.data.Dataset:
    """``read_parquet`` through Ray Data's V1 parquet datasource. The V2 one (the default in Ray 2.60) starts a
    pool of footer-reading actors (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``, 32) on every execution, i.e. on every
    epoch of every stream, to list files the manifest already lists: ~0.85 s of a 2.5 s Fashion-MNIST-LT epoch
    here (docs/performance.md section 2). One read task per shard: V1's default splits a shard into many small
    blocks, and a task per small block cost more than the actors saved on 224-px JPEGs (blocks too large for
    memory are still split by Ray Data). The choice is made when the read is declared, so the process-wide
    setting is restored at once."""
    ctx = ray.data.DataContext.get_current()
    v2 = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, shuffle=file_order, override_num_blocks=len(files))
    finally:
        ctx.use_datasource_v2 = v2


def build_dataset(root: str, split: str, *, preset: str | Preset, train: bool = True, exclude_ids=None,
                  include_ids=None, batch_size: int = 256, seed: int | None = 0, shuffle: str | None = None,
                  block_rows: int = 1024, mode: str | None = None, num_cpus: float = 1.0,
                  concurrency: int | None = None, preset_params: Mapping | None = None,
                  views: Sequence[str] = TRAIN_VIEWS) -> ray.data.Dataset:
    """A Ray Dataset of decoded, augmented rows of `root/split`.

    Columns: id, label, true_label (int64), weak + strong (train; or only the ``views`` asked for) or x (eval)
    (float32 [C,H,W]), corrupt.
    preset: a name from dynloss.data.transforms.PRESETS (decode mode from the manifest's image.mode
      unless `mode` is given; `preset_params` e.g. {"size": 299}) or a built Preset.
    exclude_ids / include_ids: numpy int array, list, or SharedIds.
    batch_size: rows per decode call (not the training batch size); block_rows: rows per decode task.
    shuffle: "full" (default when train), "blocks", or "none" (default when not train).
    seed: order seed (each execution, i.e. each epoch, reseeds from it; None = random); also the
      augmentation seed with shuffle="full" (with "blocks"/"none" augmentation draws fresh entropy).
    """
    shuffle = shuffle or ("full" if train else "none")
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle={shuffle!r} is not known; valid: {list(SHUFFLES)}")
    if batch_size < 1 or block_rows < 1:
        raise ValueError(f"batch_size and block_rows must be >= 1, got {batch_size} and {block_rows}")
    preset = resolve_preset(preset, root, mode=mode, **dict(preset_params or {}))
    files = split_locations(root, split)
    ids = {
        "include_ids": include_ids if isinstance(include_ids, SharedIds) else as_id_array(include_ids, "include_ids"),
        "exclude_ids": exclude_ids if isinstance(exclude_ids, SharedIds) else as_id_array(exclude_ids, "exclude_ids"),
    }
    if seed is None:  # Ray would pin a seed=None shuffle at plan time; draw one so epochs still differ
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    order = RandomSeedConfig(seed=int(seed), reseed_after_execution=True)
    # Augmentation is seeded per decode call from (seed, the ids in it). Only a full shuffle changes which
    # rows meet in a call from epoch to epoch; otherwise fixed seeds would repeat each epoch's augmentation.
    aug_seed = seed if shuffle == "full" else None

    file_order = ray.data.FileShuffleConfig(seed=int(seed)) if shuffle == "blocks" else None
    ds = _read_shards(files, file_order).select_columns(list(SHARD_COLUMNS))
    if ids["include_ids"] is not None or ids["exclude_ids"] is not None:
        # Whole blocks, zero-copy: the filter fuses with the read and costs one hash lookup per row.
        ds = ds.map_batches(_filter_block, fn_kwargs=ids, batch_format="pyarrow", batch_size=None,
                            zero_copy_batch=True)
    if shuffle == "full":
        ds = ds.random_shuffle(seed=order)  # shuffles encoded bytes, before the (larger) decoded pixels exist
    # A shard is read as one block; decoding one block is one task, and its output reaches the consumer only
    # when the task ends. Small blocks let several decode tasks run at once and the first batches stream.
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    if shuffle == "blocks":
        ds = ds.randomize_block_order(seed=order)
    return ds.map_batches(views_from_rows, fn_kwargs={"preset": preset, "train": train, "seed": aug_seed,
                                                      "views": tuple(views)},
                          batch_format="pyarrow", batch_size=batch_size, zero_copy_batch=True,
                          num_cpus=num_cpus, concurrency=concurrency)


# -------------------------------------------------------------------------------------------- consuming
class CountingCollate(NumpyBatchCollateFn):
    """Tensors per column, placeholder rows dropped, `corrupt` summed to a 0-dim tensor for the batch."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch)


def iter_train_batches(shard, batch_size: int, device="auto", epoch: int = 0, *, seed: int = 0,
                       local_shuffle_buffer_size: int | None = None, drop_last: bool = False,
                       prefetch_batches: int = 2) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of a Ray Train dataset shard (or any Dataset / DataIterator) as dicts of tensors.

    Keys: id, label, true_label, weak + strong (or x), corrupt (0-dim: images dropped for this batch).
    device "auto" = the Ray Train worker's device (cpu outside Ray Train). The dataset's order already
    changes every epoch (every execution); `epoch` only seeds the optional local shuffle buffer.
    """
    shuffle_seed = None if local_shuffle_buffer_size is None else int(seed) * 1_000_003 + int(epoch)
    return shard.iter_torch_batches(batch_size=batch_size, device=device, collate_fn=CountingCollate(),
                                    drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size,
                                    local_shuffle_seed=shuffle_seed, prefetch_batches=prefetch_batches)


#: the same iterator for a whole Dataset (outside Ray Train).
iter_torch_batches_with_counts = iter_train_batches
