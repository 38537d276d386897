"""Ray Data ingest on a real local Ray runtime (2 CPUs) over real parquet shards of PNG digits, through both
sources of `build_dataset`: the split held in the object store (small splits) and streamed from parquet.

    .venv/bin/python -m pytest tests/test_ingest.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from ingest_shards import digits, encode, write_digits, write_manifest, write_split

ray = pytest.importorskip("ray")

from dynloss.data.transforms import build_preset
from pipelines import gc_tuning
from pipelines.data import IN_MEMORY_MB, SharedIds, build_dataset, iter_train_batches
from pipelines.data_limits import FirstLimits, first_limits

pytestmark = [
    pytest.mark.ray,
    pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning"),
]

N = 200  # rows per split; even, so an equal 2-way split keeps every row
CORRUPT = 37



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    _images, labels = write_digits(str(root), n=N, n_shards=4, splits=("train", "test"))
    return str(root), labels


@pytest.fixture(scope="module")
def corrupt_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits_corrupt")
    write_digits(str(root), n=60, n_shards=2, corrupt_ids=[CORRUPT])
    return str(root)


#: build_dataset's in_memory_mb for the two sources: a split held in the object store, or streamed from parquet
SOURCES = {"held": IN_MEMORY_MB, "streamed": 0}


@pytest.fixture(params=list(SOURCES))
def in_memory_mb(request):
    return SOURCES[request.param]


def epoch_ids(ds_or_shard, **kw) -> tuple[list[int], int, list[dict]]:
    batches = list(iter_train_batches(ds_or_shard, batch_size=kw.pop("batch_size", 64), **kw))
    ids = torch.cat([b["id"] for b in batches]).tolist()
    return ids, sum(int(b["corrupt"]) for b in batches), batches


def test_token_auth_is_on_for_the_local_runtime(ray_local):
    from ray._raylet import AuthenticationMode, get_authentication_mode

    assert os.environ["RAY_AUTH_MODE"] == "token" and get_authentication_mode() == AuthenticationMode.TOKEN
    assert ray.get(ray.remote(lambda: os.environ.get("RAY_AUTH_MODE")).remote()) == "token"


def test_auth_policy_turns_token_auth_on_and_never_off(ray_local, monkeypatch, tmp_path, caplog):
    from pipelines.ray_runtime import configure_auth

    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert configure_auth(connecting=False) == "disabled" and os.environ["RAY_AUTH_MODE"] == "disabled"
    assert "DISABLED" in caplog.text  # respected, but said out loud
    monkeypatch.setenv("RAY_AUTH_MODE", "tokens")
    with pytest.raises(ValueError, match="valid"):
        configure_auth(connecting=True)
    monkeypatch.delenv("RAY_AUTH_MODE")
    assert configure_auth(connecting=True) == "disabled" and "RAY_AUTH_MODE" not in os.environ  # no token: Ray decides
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x" * 32)
    assert configure_auth(connecting=True) == "token" and os.environ["RAY_AUTH_MODE"] == "token"


def test_the_dashboard_port_is_free_and_outside_the_kernels_ephemeral_range(monkeypatch):
    # init_ray names the dashboard's port before ray.init starts; a port from the ephemeral range could be handed to
    # one of the runtime's own processes by bind(0) meanwhile, and the dashboard (and ray.init) then fails.
    import random
    import socket

    from pipelines.ray_runtime import DASHBOARD_PORTS, _ephemeral_ports, _free_port

    eph = _ephemeral_ports()
    if all(p in eph for p in (DASHBOARD_PORTS[0], DASHBOARD_PORTS[-1])):
        pytest.skip(f"this kernel's ephemeral range {eph} covers {DASHBOARD_PORTS}")
    ports = [_free_port() for _ in range(10)]
    assert all(p in DASHBOARD_PORTS and p not in eph for p in ports), ports
    taken, free = ports[0], next(p for p in ports if p != ports[0])
    with socket.socket() as busy:  # a taken port is passed over
        busy.bind(("127.0.0.1", taken))
        monkeypatch.setattr(random, "sample", lambda population, k: [taken, free])
        assert _free_port() == free


def test_exclude_ids_yields_exactly_the_complement_with_labels_and_views(ray_local, shards, in_memory_mb):
    root, labels = shards
    meta = np.random.default_rng(0).choice(N, size=50, replace=False)
    ds = build_dataset(root, "train", preset="digits", exclude_ids=meta, batch_size=32, seed=0,
                       in_memory_mb=in_memory_mb)
    ids, corrupt, batches = epoch_ids(ds)
    assert sorted(ids) == sorted(set(range(N)) - set(meta.tolist())) and corrupt == 0
    b = batches[0]
    assert set(b) == {"id", "label", "true_label", "weak", "strong", "corrupt"}
    assert b["weak"].shape[1:] == (1, 8, 8) and b["weak"].dtype == torch.uint8
    assert not torch.equal(b["weak"], b["strong"])
    assert np.array_equal(b["label"].numpy(), labels[b["id"].numpy()])


def test_two_consumers_get_disjoint_halves_covering_the_epoch(ray_local, shards, in_memory_mb):
    root, _ = shards
    ds = build_dataset(root, "test", preset="digits", train=False, seed=0, in_memory_mb=in_memory_mb)
    splits = ds.streaming_split(2, equal=True)  # what Ray Train does with datasets={"train": ds}
    got: list[list[int]] = [[], []]

    def consume(i):
        got[i] = epoch_ids(splits[i], batch_size=32)[0]

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(got[0]) == len(got[1]) == N // 2
    assert not set(got[0]) & set(got[1]) and sorted(got[0] + got[1]) == list(range(N))


def test_a_corrupt_image_is_dropped_and_counted(ray_local, corrupt_shards, in_memory_mb):
    ids, corrupt, batches = epoch_ids(build_dataset(corrupt_shards, "train", preset="digits", batch_size=16,
                                                    in_memory_mb=in_memory_mb))
    assert sorted(ids) == [i for i in range(60) if i != CORRUPT] and corrupt == 1
    assert all(b["weak"].shape[0] == b["id"].shape[0] for b in batches)


def test_encoded_rows_decoded_by_the_consumer_cover_the_epoch_and_count_the_corrupt(ray_local, corrupt_shards,
                                                                                      in_memory_mb):
    """``data.decode_on: device``: the dataset hands out the filtered, shuffled rows still encoded and the consumer
    decodes each batch (on its device; the CPU here), dropping and counting a corrupt image as the decode tasks do."""
    ds = build_dataset(corrupt_shards, "train", preset="digits", batch_size=16, exclude_ids=[3, 4],
                       in_memory_mb=in_memory_mb, decode=False)
    assert set(ds.schema().names) == {"id", "image", "label", "true_label"}
    decode = {"preset": build_preset("digits"), "train": True, "views": ("weak",), "device": "cpu", "seed": 0}
    ids, corrupt, batches = epoch_ids(ds, batch_size=16, decode=decode)
    assert sorted(ids) == [i for i in range(60) if i not in (CORRUPT, 3, 4)] and corrupt == 1
    assert all(set(b) == {"id", "label", "true_label", "weak", "corrupt"} for b in batches)
    assert all(b["weak"].shape == (len(b["id"]), 1, 8, 8) and b["weak"].dtype == torch.uint8 for b in batches)
    assert ids != sorted(ids)  # shuffled before it was decoded


def test_the_consumer_decodes_the_views_the_decode_tasks_would_make(ray_local, shards):
    """One decode task (held split), decode calls the size of the consumer's batches: the same rows meet in each,
    so decoding in the consumer gives the decode tasks' views exactly (same rows, seeds and decoder; Ray Data may
    hand out a task's blocks in another order)."""
    root, _ = shards
    common = {"preset": "digits", "batch_size": 25, "seed": 4, "concurrency": 1, "views": ("weak",)}
    tasks = epoch_ids(build_dataset(root, "train", **common), batch_size=25)[2]
    decode = {"preset": build_preset("digits"), "train": True, "views": ("weak",), "device": "cpu", "seed": 4}
    here = epoch_ids(build_dataset(root, "train", decode=False, **common), batch_size=25, decode=decode)[2]
    by_rows = {tuple(b["id"].tolist()): b["weak"] for b in tasks}
    assert len(tasks) == len(here) == len(by_rows) == N // 25
    for b in here:
        assert torch.equal(by_rows[tuple(b["id"].tolist())], b["weak"])


def test_each_epoch_comes_in_a_new_order(ray_local, shards, in_memory_mb):
    root, _ = shards
    ds = build_dataset(root, "train", preset="digits", batch_size=32, seed=3, in_memory_mb=in_memory_mb)
    first, second = (epoch_ids(ds, epoch=e)[0] for e in (0, 1))
    assert sorted(first) == sorted(second) == list(range(N))
    assert first != second
    assert first != sorted(first)  # shuffled, not shard order


def test_a_small_split_is_held_and_each_epoch_of_a_split_stream_is_a_new_full_permutation(ray_local, shards):
    # Held: no parquet read, shuffle or repartition stage per epoch; the order comes from the decode tasks, the same
    # permutation in each (else rows would repeat or go missing), a new one per execution, also through
    # streaming_split (what Ray Train runs: one execution per epoch shared by the workers).
    root, _ = shards
    ds = build_dataset(root, "train", preset="digits", batch_size=16, seed=5)
    ops, op = [], ds._logical_plan.dag
    while op is not None:
        ops.append(op.name)
        op = op.input_dependencies[0] if op.input_dependencies else None
    assert not any(name.startswith(("ReadParquet", "RandomShuffle", "Repartition")) for name in ops), ops
    # Ray Data's resource allocator budgets it as any other dataset: without it (session 21) the last decode task of
    # a `dynloss train` epoch sat paused by backpressure and the training ran 1.5x slower (docs/performance.md)
    assert ds.context.op_resource_reservation_enabled is True
    splits = ds.streaming_split(2, equal=False)
    epochs = []
    for _ in range(2):
        got: list[list[int]] = [[], []]
        threads = [threading.Thread(target=lambda i=i: got[i].extend(epoch_ids(splits[i], batch_size=16)[0]))
                   for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert sorted(got[0] + got[1]) == list(range(N)) and not set(got[0]) & set(got[1])
        epochs.append(got[0] + got[1])
    assert epochs[0] != epochs[1] and epochs[0] != sorted(epochs[0])


def test_each_decode_call_reaches_the_consumer_as_its_own_block(ray_local, shards, in_memory_mb):
    # Ray Data gathers a task's output into blocks of the dataset's target size (128 MiB by default): a streamed
    # decode task's views came as one block at the task's end (~1,000 224-px views), the consumer idle meanwhile.
    # 96-px views, 16 rows per call: each call's ~150 KB must be a block of its own, and no row lost or repeated.
    ds = build_dataset(shards[0], "train", preset="imagenet", preset_params={"size": 96}, batch_size=16,
                       views=("weak",), in_memory_mb=in_memory_mb)
    blocks = list(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0))  # one per block
    assert sorted(np.concatenate([b["id"] for b in blocks]).tolist()) == list(range(N))
    assert max(len(b["id"]) for b in blocks) <= 16 and blocks[0]["weak"].shape[1:] == (1, 96, 96)


FREEZE_PROBE = """
import gc, json, sys
thresholds = [gc.get_threshold()]
import numpy as np
from dynloss.data.batches import read_rows, views_from_rows
from dynloss.data.transforms import build_preset
from pipelines.data import _decode_call
thresholds.append(gc.get_threshold())

rows = read_rows(sys.argv[1], "train").slice(0, 16)
decode = {"preset": build_preset("digits"), "train": True, "seed": 3, "views": ("weak",)}
frozen = []
for _ in range(8):
    out = _decode_call(rows, **decode)
    frozen.append(gc.get_freeze_count())
same = all(np.array_equal(out[k], v) for k, v in views_from_rows(rows, **decode).items())
loop = {}
loop["self"] = loop  # cyclic garbage made after the freezes
del loop
thresholds.append(gc.get_threshold())
print(json.dumps({"frozen": frozen, "same": same, "collected": gc.collect(), "thresholds": thresholds}))
"""


def test_a_decode_process_freezes_its_long_lived_objects_and_still_collects_new_garbage(shards):
    """A decode task's worker holds ~440k objects once torch and Ray are imported; at full decode rate Python's full
    collection walked them every ~6 s, 0.2-0.25 s each (a stall of the stream). ``pipelines.gc_tuning``: importing
    the package raises the young generation's threshold for start-up, and ``_decode_call`` collects, freezes and puts
    the default thresholds back on the process's 4th, 8th, ... call. A fresh process (this test's own must stay as it
    is) freezes nothing before its 4th call and nothing more until its 8th, decodes the same views, and still
    collects garbage made after."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", FREEZE_PROBE, shards[0]], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["frozen"][:3] == [0, 0, 0] and got["frozen"][3] > 10_000, got["frozen"]  # torch alone: >100k
    assert max(got["frozen"][4:7]) <= got["frozen"][3]  # none added between the 4th call and the 8th
    assert got["same"] and got["collected"] >= 1
    if got["thresholds"][0] == list(gc_tuning.DEFAULT):  # CPython's default (3.11): raised for start-up, then back
        assert got["thresholds"][1:] == [list(gc_tuning.STARTUP), list(gc_tuning.DEFAULT)]


def test_an_execution_runs_its_tasks_side_by_side_from_its_first_steps(ray_local, shards):
    # Ray Data read its resource limits as zero for each execution's first second (the coordinator's first answer,
    # kept 1 s) and ran one task at a time meanwhile: two 0.9 s tasks on two free CPUs ran one after the other.
    # Through streaming_split, as Ray Train runs it: the callback travels with the dataset to the coordinator actor.
    # Several tries: a try may meet a worker process still starting; without FirstLimits none overlaps.
    for in_memory_mb in SOURCES.values():
        ds = build_dataset(shards[0], "train", preset="digits", in_memory_mb=in_memory_mb)
        assert FirstLimits in ds.context.custom_execution_callback_classes

    def timed_task(batch):  # local: pickled by value for the coordinator actor (tests/ is not on its path)
        start = time.time()
        time.sleep(0.9)
        return {"start": np.array([start]), "end": np.array([time.time()])}

    ds = first_limits(ray.data.range(2, override_num_blocks=2).map_batches(timed_task, batch_size=None))
    (split,) = ds.streaming_split(1)
    tries = []
    for _ in range(3):
        rows = list(split.iter_rows())
        assert len(rows) == 2
        tries.append(max(r["start"] for r in rows) < min(r["end"] for r in rows))
        if tries[-1]:
            break
    assert tries[-1], f"the two tasks never overlapped in {len(tries)} executions"


def test_shards_are_read_without_a_footer_actor_pool_per_epoch(ray_local, shards, monkeypatch):
    # Ray Data's V2 parquet read starts 32 footer-reading actors on every execution (~0.85 s of each epoch's
    # stream on a small split); the shards come through the V1 read, and the process-wide choice is left alone.
    ctx = ray.data.DataContext.get_current()
    monkeypatch.setattr(ctx, "use_datasource_v2", True)  # Ray 2.60's default, whatever the environment says
    ds = build_dataset(shards[0], "train", preset="digits", seed=0, in_memory_mb=0)
    op = ds._logical_plan.dag
    while op.input_dependencies:
        op = op.input_dependencies[0]
    assert op.name == "ReadParquet" and ctx.use_datasource_v2
    assert sorted(epoch_ids(ds)[0]) == list(range(N))


def test_block_order_is_refused_on_shards_in_class_runs_and_mixes_shuffled_rows(ray_local, tmp_path):
    # shuffle "blocks" reorders whole blocks and keeps a block's rows together: on shards written class by class
    # (image folders, WebVision's lists) every batch would hold one or two classes; refused before anything runs
    images, labels = digits(400)
    blobs = [encode(img) for img in images]
    for name, idx in (("sorted", np.argsort(labels, kind="stable")), ("mixed", np.random.default_rng(0).permutation(400))):
        root = str(tmp_path / name)  # a manifest without label_runs: the check reads the label columns
        write_manifest(root, {"train": write_split(root, "train", [blobs[i] for i in idx], labels[idx], n_shards=2)})
    with pytest.raises(ValueError, match=r"split 'train' holds its classes in runs .*--row-order shuffled"):
        build_dataset(str(tmp_path / "sorted"), "train", preset="digits", shuffle="blocks")
    ds = build_dataset(str(tmp_path / "mixed"), "train", preset="digits", shuffle="blocks", block_rows=64,
                       batch_size=32)
    for _ in range(2):
        ids, _, batches = epoch_ids(ds, batch_size=32)
        assert sorted(ids) == list(range(400))
        assert min(len(set(b["label"].tolist())) for b in batches[:-1]) >= 5  # ~9.6 of 10 in a random order


def test_shared_ids_change_the_filter_between_epochs_without_rebuilding(ray_local, shards, in_memory_mb):
    root, _ = shards
    meta = SharedIds(np.arange(0, 100))
    ds = build_dataset(root, "test", preset="digits", train=False, exclude_ids=meta, in_memory_mb=in_memory_mb)
    assert sorted(epoch_ids(ds)[0]) == list(range(100, N))
    meta.set(np.arange(100, N))
    assert sorted(epoch_ids(ds)[0]) == list(range(100))


def test_bad_arguments_name_the_field(ray_local, shards):
    root, _ = shards
    with pytest.raises(ValueError, match="shuffle='random'.*full"):
        build_dataset(root, "train", preset="digits", shuffle="random")
    with pytest.raises(ValueError, match="exclude_ids must be integer"):
        build_dataset(root, "train", preset="digits", exclude_ids=np.array([0.5]))
    with pytest.raises(ValueError, match="valid presets"):
        build_dataset(root, "train", preset="digitz")
    with pytest.raises(ValueError, match="no split 'val'"):
        build_dataset(root, "val", preset="digits")


def test_a_benchmark_of_a_missing_dataset_is_a_message_not_a_traceback(tmp_path, capsys):
    from pipelines.benchmark import main

    assert main(["ingest", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("benchmark ingest: error: no manifest.json in") and "Traceback" not in err
