"""Ray Data input pipeline: parquet shards -> id filter -> shuffle -> decode + weak/strong views -> train workers.

DESIGN.md section 5, "Ingest". `build_dataset` declares the pipeline on the driver; each Ray Train worker
reads its part with `iter_train_batches(ray.train.get_dataset_shard("train"), ...)`:

    ds = build_dataset("data/fmnist", "train", preset="fashion-mnist", exclude_ids=meta_ids, seed=0)
    trainer = TorchTrainer(loop, datasets={"train": ds}, ...)          # Ray Train splits it per worker
    # in loop(), every epoch:
    for batch in iter_train_batches(ray.train.get_dataset_shard("train"), batch_size=128, epoch=epoch):
        batch["weak"], batch["strong"], batch["label"], batch["id"]   # tensors on the worker's device
        x = preset.normalise(batch["weak"])                            # uint8 views -> the model's float32 input
        batch["corrupt"]                                               # 0-dim: images dropped in this batch

- Source: a split whose shards total at most `in_memory_mb` (the manifest's `bytes`) is read once, on the driver,
  and held encoded in Ray's object store; each epoch its decode tasks draw their rows from it in that epoch's
  order (`_held_split`: no read, shuffle or repartition stage per epoch). A larger split streams from its shards:
  `ray.data.read_parquet` (the V1 datasource: see `_read_shards`) over the shards listed in ROOT/manifest.json
  (local path or pyarrow URI, s3://, gs://).
- Filter: `include_ids` / `exclude_ids` (the per-epoch meta set in or out) as a numpy array, applied with
  `pyarrow.compute.is_in` per block, or as a `SharedIds` whose content may change between epochs
  without rebuilding the dataset (the dataset handed to a TorchTrainer cannot be replaced).
- Order: a new one every epoch, reproducible from `seed`: a full shuffle of the encoded rows (default; shards
  may be written class by class: a permutation of the held split, or `random_shuffle` of the streamed one) or,
  streamed only, `randomize_block_order` (+ an optional local shuffle buffer at iteration) for very large data,
  refused on shards whose classes come in runs (`dynloss.data.order`: prepare them with `--row-order shuffled`);
  each execution reseeds (RandomSeedConfig(reseed_after_execution)).
- Decode + augment: one `map_batches` decodes each image once and makes the views asked for (a stream that
  trains on the weak view skips the strong one; `dynloss.data.batches.views_from_rows`); a corrupt image is
  dropped and counted in the `corrupt` column (see that module), which `iter_train_batches` sums per batch.
  The views are uint8 (normalised where the batch lands: `dynloss.builder.Components.input`). Rows per decode
  call: about DECODE_CALL_BYTES of views (`decode_rows`: 1,024 28x28 images, 222 224-px ones), unless
  `batch_size` says otherwise; each call's views are one output block (`_call_blocks`), so batches reach the
  consumer while a decode task runs.
- Or no decode at all (`decode=False`, config `data.decode_on: device`): the rows reach the consumer encoded and
  `iter_train_batches(..., decode=...)` decodes each batch where it is consumed, the JPEGs on the worker's GPU
  (nvJPEG, `dynloss.data.batches.views_on_device`), for nodes with more GPU than CPU to spare.

CPU: the decode tasks take `num_cpus` each (default 1) and Ray Data runs as many as fit, from each execution's
first scheduling steps on (`pipelines.data_limits`: Ray Data alone ran one task for an execution's first second);
on a small machine pass `concurrency=1` (or a fractional `num_cpus`) so the train workers keep their share.

    .venv/bin/python -c "from pipelines.ray_runtime import init_ray; from pipelines.data import build_dataset; \
init_ray(num_cpus=2); print(build_dataset('data/digits', 'test', preset='digits', train=False).count())"
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence

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
    read_rows,
    resolve_preset,
    rows_in_order,
    split_locations,
    views_from_rows,
    views_on_device,
)
from dynloss.data.manifest import read_manifest
from dynloss.data.order import check_block_order
from dynloss.data.transforms import TRAIN_VIEWS, Preset
from pipelines import gc_tuning
from pipelines.data_limits import first_limits

__all__ = [
    "IN_MEMORY_MB",
    "SHUFFLES",
    "CountingCollate",
    "SharedIds",
    "augment_seed",
    "build_dataset",
    "decode_rows",
    "is_held",
    "iter_local_batches",
    "iter_torch_batches_with_counts",
    "iter_train_batches",
    "load_split_numpy",
]

SHUFFLES = ("full", "blocks", "none")
#: splits up to this many MB of shards are held in the object store by default (config: data.in_memory_mb)
IN_MEMORY_MB = 512
#: decoded bytes per decode call (and per output block of a held split) when `batch_size` is not given
DECODE_CALL_BYTES = 32 << 20


def decode_rows(preset: Preset, train: bool = True, views: Sequence[str] = TRAIN_VIEWS) -> int:
    """Rows per decode call: ~DECODE_CALL_BYTES of uint8 views, 16 to 1,024. Larger calls cost less per image
    (Fashion-MNIST: ~12% less at 1,024 rows than at 256, docs/performance.md section 2); the byte budget keeps
    224-px output blocks small."""
    return int(min(1024, max(16, DECODE_CALL_BYTES // _row_bytes(preset, train, views))))


def _row_bytes(preset: Preset, train: bool, views: Sequence[str]) -> int:
    return preset.view_bytes * (len(views) if train else 1)


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
                  include_ids=None, batch_size: int | None = None, seed: int | None = 0, shuffle: str | None = None,
                  block_rows: int = 1024, in_memory_mb: float = IN_MEMORY_MB, mode: str | None = None,
                  num_cpus: float = 1.0, concurrency: int | None = None, preset_params: Mapping | None = None,
                  views: Sequence[str] = TRAIN_VIEWS, decode: bool = True) -> ray.data.Dataset:
    """A Ray Dataset of decoded, augmented rows of `root/split`.

    Columns: id, label, true_label (int64), weak + strong (train; or only the ``views`` asked for) or x (eval)
    (uint8 [C,H,W]), corrupt. decode=False: the filtered, ordered rows still encoded (id, image, label,
    true_label), for a consumer that decodes them itself (`iter_train_batches(decode=...)`).
    preset: a name from dynloss.data.transforms.PRESETS (decode mode from the manifest's image.mode
      unless `mode` is given; `preset_params` e.g. {"size": 299}) or a built Preset.
    exclude_ids / include_ids: numpy int array, list, or SharedIds.
    batch_size: rows per decode call (not the training batch size; default `decode_rows`).
    in_memory_mb: a split whose shards total at most this many MB (manifest `bytes`) is held encoded in the
      object store and ordered inside its decode tasks (`_held_split`); a larger one, or shuffle="blocks",
      streams from parquet, `block_rows` rows per decode task. 0 always streams.
    shuffle: "full" (default when train), "blocks" (ValueError on shards in class runs:
      `dynloss.data.order.check_block_order`), or "none" (default when not train).
    seed: order seed (each execution, i.e. each epoch, reseeds from it; None = random); also the
      augmentation seed with shuffle="full" (with "blocks"/"none" augmentation draws fresh entropy).
    """
    shuffle = shuffle or ("full" if train else "none")
    if shuffle not in SHUFFLES:
        raise ValueError(f"shuffle={shuffle!r} is not known; valid: {list(SHUFFLES)}")
    if (batch_size is not None and batch_size < 1) or block_rows < 1:
        raise ValueError(f"batch_size and block_rows must be >= 1, got {batch_size} and {block_rows}")
    preset = resolve_preset(preset, root, mode=mode, **dict(preset_params or {}))
    files = split_locations(root, split)
    if shuffle == "blocks":
        check_block_order(root, split)  # class-ordered shards would make batches of one class
    ids = {
        "include_ids": include_ids if isinstance(include_ids, SharedIds) else as_id_array(include_ids, "include_ids"),
        "exclude_ids": exclude_ids if isinstance(exclude_ids, SharedIds) else as_id_array(exclude_ids, "exclude_ids"),
    }
    if seed is None:  # Ray would pin a seed=None shuffle at plan time; draw one so epochs still differ
        seed = int(np.random.SeedSequence().generate_state(1)[0])
    order = RandomSeedConfig(seed=int(seed), reseed_after_execution=True)
    aug_seed = augment_seed(seed, shuffle)
    rows = batch_size or decode_rows(preset, train, views)
    decode = {"preset": preset, "train": train, "seed": aug_seed, "views": tuple(views)} if decode else None
    tasks = {"num_cpus": num_cpus, "concurrency": concurrency}

    if is_held(root, split, shuffle, in_memory_mb):
        ds = _held_split(root, split, ids, order if shuffle == "full" else None, rows, decode, **tasks)
    else:
        ds = _streamed(files, ids, order, shuffle, seed, block_rows, rows, decode, tasks)
    return first_limits(ds)  # all its tasks from an execution's first steps, not one for its first second


def _streamed(files: list[str], ids: dict, order: RandomSeedConfig, shuffle: str, seed: int, block_rows: int,
              rows: int, decode: dict | None, tasks: dict) -> ray.data.Dataset:
    """A split streamed from its parquet shards: read, id filter, shuffle, repartition, decode (`build_dataset`)."""
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
    if decode is None:
        return ds
    ds = ds.map_batches(_decode_call, fn_kwargs=decode, batch_format="pyarrow", batch_size=rows,
                        zero_copy_batch=True, **tasks)
    return _call_blocks(ds, rows, decode)


def augment_seed(seed: int | None, shuffle: str) -> int | None:
    """The seed of a stream's augmentation: each decode call is seeded from (it, the ids in the call). Only a full
    shuffle changes which rows meet in a call from epoch to epoch; otherwise fixed seeds would repeat each epoch's
    augmentation, so the other orders draw fresh entropy (None)."""
    return seed if shuffle == "full" else None


def is_held(root: str, split: str, shuffle: str = "full", in_memory_mb: float = IN_MEMORY_MB) -> bool:
    """Whether `build_dataset` holds the split in the object store (else it streams it from parquet): shards
    totalling at most `in_memory_mb` by the manifest (unknown sizes stream), and an order other than "blocks"."""
    shards = read_manifest(root).get("splits", {}).get(split, {}).get("shards", [])
    sizes = [s.get("bytes") for s in shards]
    size = float(sum(sizes)) if sizes and None not in sizes else float("inf")
    return shuffle != "blocks" and size <= in_memory_mb * 2**20


def _held_split(root: str, split: str, ids: dict, order: RandomSeedConfig | None, rows: int, decode: dict | None,
                num_cpus: float, concurrency: int | None) -> ray.data.Dataset:
    """A small split without a read, shuffle or repartition stage per epoch. Its rows are read once here and put in
    the object store; an epoch is `n` decode tasks, task i decoding slice i of that epoch's order, `rows` rows per
    call, each call's views one output block (so batches reach the consumer while the task runs). `n` is the
    decode tasks that fit at once, one task per slot: each further task on a slot cost ~0.17 s of a ~0.9 s
    Fashion-MNIST-LT epoch on 1 CPU (two tasks against one, alternating; docs/performance.md section 2).
    decode=None: the tasks hand out the rows of their slices encoded."""
    table = read_rows(root, split)
    cpus = float(ray.cluster_resources().get("CPU", 1))
    slots = concurrency or max(1, int(cpus // num_cpus if num_cpus > 0 else cpus))
    n = max(1, min(-(-len(table) // rows), slots))
    ds = ray.data.range(n, override_num_blocks=n).map_batches(
        _decode_slices, fn_kwargs={"held": [ray.put(table)], "tasks": n, "order": order, "rows": rows, "decode": decode,
                                   **ids},
        batch_size=None, num_cpus=num_cpus, concurrency=concurrency)
    _call_blocks(ds, rows, decode, encoded_row_bytes=max(1, table.nbytes // max(1, len(table))))
    # Ray Data's resource allocator stays on (op_resource_reservation_enabled, a kill-switch Ray means to remove):
    # turned off, the last decode task of each `dynloss train` epoch sat paused by backpressure for most of the epoch
    # while the training slowed 1.5x (docs/performance.md section 2, session 22). What had kept a held split's tasks
    # one at a time with it on was the zero limits of an execution's first second (`pipelines.data_limits`).
    return ds


def _call_blocks(ds: ray.data.Dataset, rows: int, decode: dict | None, encoded_row_bytes: int = 1) -> ray.data.Dataset:
    """``ds`` with each decode call's output (``rows`` rows: their views, or ``encoded_row_bytes`` each when
    ``decode`` is None) its own block. Ray Data gathers a task's output into blocks of the dataset's
    ``target_max_block_size`` (flushed above it, cut at 1.5x; 128 MiB by default), so a streamed decode
    task's ~1,000 224-px views (150 MB) reached the consumer as one block when the task ended, and the consumer's
    work on the first and last of them ran beside no decode. A target of 0.75 of a call's bytes makes each call a
    block (docs/performance.md section 2, session 25: 224-px JPEGs streamed on 1 CPU 0.88-0.91 per core against
    0.69-0.82). The target is the dataset's (Ray Data has none per operator); the read and shuffle blocks of a
    streamed split kept their sizes (4,000 224-px JPEGs in 64 MB shards: 3 shuffled blocks of 46 MB, as before)."""
    row_bytes = _row_bytes(decode["preset"], decode["train"], decode["views"]) if decode else encoded_row_bytes
    ds.context.target_max_block_size = max(64 << 10, int(0.75 * rows * row_bytes))
    return ds


def _decode_slices(batch: dict[str, np.ndarray], held: list, tasks: int, order: RandomSeedConfig | None, rows: int,
                   decode: dict | None, include_ids, exclude_ids) -> Iterator[dict[str, np.ndarray] | pa.Table]:
    """Decode task of a held split: for each slice index in ``batch["id"]``, that slice of this execution's order
    (rows left by the id filter; a permutation from (seed, execution index), the same in every task, or id order
    when ``order`` is None), in calls of ``rows`` rows. ``held`` wraps the table's ObjectRef (a ref inside a list
    is passed as a ref, read here zero-copy). ``decode`` None: the rows themselves, encoded."""
    table = _filter_block(ray.get(held[0]), include_ids, exclude_ids)
    if order is None:
        perm = np.arange(len(table))
    else:
        st = order.get_seed_tuple(data_context=ray.data.DataContext.get_current())
        perm = np.random.default_rng([st.seed, st.execution_idx]).permutation(len(table))
    per_task = -(-len(table) // tasks)
    for i in batch["id"]:
        for chunk in rows_in_order(table, perm[int(i) * per_task:(int(i) + 1) * per_task], rows):
            yield chunk if decode is None else _decode_call(chunk, **decode)


_DECODE_CALLS = 0  # decode calls made in this process (a Ray Data worker's)


def _decode_call(rows: pa.Table, **decode) -> dict[str, np.ndarray]:
    """``views_from_rows`` in a decode task; on the process's 4th, 8th, 16th, ... call its long-lived objects are
    moved out of the garbage collector's way first (``pipelines.gc_tuning.settle``: its imports come with the first
    calls)."""
    global _DECODE_CALLS
    _DECODE_CALLS += 1
    if _DECODE_CALLS >= 4 and not _DECODE_CALLS & (_DECODE_CALLS - 1):
        gc_tuning.settle()
    return views_from_rows(rows, **decode)


# -------------------------------------------------------------------------------------------- consuming
class CountingCollate(NumpyBatchCollateFn):
    """Tensors per column, placeholder rows dropped, `corrupt` summed to a 0-dim tensor for the batch."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return collate(batch)


def iter_train_batches(shard, batch_size: int, device="auto", epoch: int = 0, *, seed: int = 0,
                       local_shuffle_buffer_size: int | None = None, drop_last: bool = False,
                       prefetch_batches: int = 2, decode: Mapping | None = None) -> Iterable[dict[str, torch.Tensor]]:
    """Batches of a Ray Train dataset shard (or any Dataset / DataIterator) as dicts of tensors.

    Keys: id, label, true_label, weak + strong (or x), corrupt (0-dim: images dropped for this batch).
    device "auto" = the Ray Train worker's device (cpu outside Ray Train). The dataset's order already
    changes every epoch (every execution); `epoch` only seeds the optional local shuffle buffer.
    decode: for a dataset built with ``decode=False``, `views_on_device`'s arguments but the rows (preset, train,
    device, seed, views): each batch is decoded here, in the consumer's thread, its views on ``decode["device"]``
    (``device`` and ``prefetch_batches`` are not used then: the encoded batches are fetched as they are asked for,
    while Ray Data's executor still runs ahead).
    """
    shuffle_seed = None if local_shuffle_buffer_size is None else int(seed) * 1_000_003 + int(epoch)
    if decode is not None:
        # Decoded here, not in a collate_fn: that runs in Ray's prefetch thread, and seeded views borrow torch's
        # global CPU generator (`dynloss.data.transforms`), which the training thread draws from too. No prefetch
        # thread at all: beside one, decoding Fashion-MNIST-LT here took ~10 s an epoch instead of ~0.8 s (many short
        # GIL-releasing calls, each waiting for the GIL back; docs/performance.md section 2), and fetching the encoded
        # batches costs ~0.1 s an epoch.
        encoded = shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last,
                                     local_shuffle_buffer_size=local_shuffle_buffer_size,
                                     local_shuffle_seed=shuffle_seed, prefetch_batches=0)
        return (views_on_device(b, **decode) for b in encoded)
    return shard.iter_torch_batches(batch_size=batch_size, device=device, collate_fn=CountingCollate(),
                                    drop_last=drop_last, local_shuffle_buffer_size=local_shuffle_buffer_size,
                                    local_shuffle_seed=shuffle_seed, prefetch_batches=prefetch_batches)


#: the same iterator for a whole Dataset (outside Ray Train).
iter_torch_batches_with_counts = iter_train_batches
