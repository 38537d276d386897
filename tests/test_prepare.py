"""`python -m pipelines.prepare` end to end on real files: round trips, protocol provenance, bad input,
resume after a crash, process pool and Ray parity.

    .venv/bin/python -m pytest tests/test_prepare.py -q
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dynloss.data import load_source, read_manifest, read_split
from dynloss.data import shards as shards_module
from dynloss.data.order import check_block_order
from dynloss.data.plan import scan_files
from dynloss.noise import add_label_noise, make_long_tailed
from pipelines.prepare import Runner, main

FASHION = Path("/usr/share/datasets/fashion-mnist")


def prepare(*argv, workers: int = 1) -> int:
    return main([*map(str, argv), "--workers", str(workers), "--no-progress"])


def shard_files(out: Path) -> dict[str, bytes]:
    m = read_manifest(str(out))
    return {s["path"]: (out / s["path"]).read_bytes() for split in m["splits"].values() for s in split["shards"]}


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_digits_round_trip_local_uri_and_process_pool(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert prepare("digits", "--out", a) == 0
    src = load_source("digits")
    m = read_manifest(str(a))
    assert m["totals"]["rows"] == 1797 and m["image"] == {"mode": "L", "size": [8, 8], "encoding": "png"}
    assert m["command"].startswith("python -m pipelines.prepare digits --out")
    for split, data in src.splits.items():
        t = read_split(str(a), split, verify=True)
        assert t.column("id").to_pylist() == list(range(len(data)))
        np.testing.assert_array_equal(t.column("label").to_numpy(), data.labels)
        np.testing.assert_array_equal(t.column("true_label").to_numpy(), data.labels)
        pixels = np.stack([decode(x) for x in t.column("image").to_pylist()])
        np.testing.assert_array_equal(pixels, data.images)  # lossless
        assert m["splits"][split]["counts"] == np.bincount(data.labels, minlength=10).tolist()
    f = pq.ParquetFile(a / "train" / "part-00000.parquet")
    assert f.metadata.num_rows == 1442 and max(f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)) <= 1000

    # the same through a file:// URI and a 2-process pool: byte-identical shards, readable by URI
    assert prepare("digits", "--out", "file://" + str(b), "--shard-size-mb", 0.05, workers=2) == 0
    mb = read_manifest("file://" + str(b))
    assert len(mb["splits"]["train"]["shards"]) > 1
    assert read_split("file://" + str(b), "train").column("id").to_pylist() == list(range(1442))
    assert prepare("digits", "--out", tmp_path / "c", "--shard-size-mb", 0.05) == 0
    assert shard_files(b) == shard_files(tmp_path / "c")


@pytest.mark.parametrize("noise,convention", [("sym:0.4", "prior"), ("asym:0.4", "exact")])
def test_noise_and_imbalance_in_manifest_match_rows(tmp_path, noise, convention):
    truth = fx.write_cifar10(tmp_path / "src", per_batch=60)
    out = tmp_path / "out"
    assert prepare("cifar10", "--root", tmp_path / "src", "--out", out, "--imbalance", 0.2, "--noise", noise,
                   "--noise-convention", convention, "--seed", 3) == 0
    images, labels = truth["train"]
    keep = make_long_tailed(labels, 0.2, seed=3)
    kind, rate = noise.split(":")
    noisy = add_label_noise(labels[keep], kind, float(rate), 10, convention=convention, dataset="cifar10", seed=3)
    t = read_split(str(out), "train")
    given, clean = t.column("label").to_numpy(), t.column("true_label").to_numpy()
    assert t.column("id").to_pylist() == list(range(len(keep)))
    np.testing.assert_array_equal(clean, labels[keep])
    np.testing.assert_array_equal(given, noisy)
    np.testing.assert_array_equal(np.stack([decode(x) for x in t.column("image").to_pylist()]), images[keep])
    m = read_manifest(str(out))
    assert 0 < m["noise"]["actual_rate"] == pytest.approx(float(np.mean(given != clean)))
    assert m["noise"]["noisy_rows"] == int((given != clean).sum()) and m["noise"]["kind"] == kind
    assert m["imbalance"]["counts_after"] == np.bincount(clean, minlength=10).tolist()
    assert m["imbalance"]["counts_before"] == np.bincount(labels, minlength=10).tolist()
    assert m["splits"]["train"]["counts"] == np.bincount(given, minlength=10).tolist()
    test = read_split(str(out), "test")  # test split untouched by the protocols
    assert test.num_rows == 60 and test.column("label").equals(test.column("true_label"))


def test_file_source_keeps_bytes_and_unknown_truth(tmp_path):
    lists = fx.write_webvision(tmp_path / "wv")
    fx.write_imagenet_val_flat(tmp_path / "inval")
    out = tmp_path / "out"
    assert prepare("webvision-mini", "--root", tmp_path / "wv", "--imagenet-val", tmp_path / "inval", "--out", out) == 0
    m = read_manifest(str(out))
    assert list(m["splits"]) == ["train", "val", "imagenet_val"] and m["image"]["encoding"] == "original"
    t = read_split(str(out), "train")
    kept = [(p, y) for p, y in lists["google"] if y < 50]
    assert t.column("image").to_pylist() == [(tmp_path / "wv" / p).read_bytes() for p, _ in kept]
    assert t.column("label").to_pylist() == [y for _, y in kept]
    assert set(t.column("true_label").to_pylist()) == {-1}
    assert m["noise"]["actual_rate"] is None and m["splits"]["train"]["true_counts"] is None
    assert read_split(str(out), "imagenet_val").column("true_label").to_pylist() == [1, 0]


def _broken_webvision(root: Path) -> list[tuple[str, int]]:
    lists = fx.write_webvision(root)
    bad = root / "google/q0001/00000002.jpg"
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated JPEG: passes verify(), not decode
    (root / "flickr/q0001/00000001.jpg").unlink()  # missing
    return lists["google"] + lists["flickr"]


def test_corrupt_and_missing_files_are_listed_and_nothing_else_lost(tmp_path, capsys):
    rows = _broken_webvision(tmp_path / "wv")
    out = tmp_path / "out"
    assert prepare("webvision", "--root", tmp_path / "wv", "--out", out) == 0
    assert "rejected 2 files" in capsys.readouterr().out
    with open(out / "rejected.csv") as f:
        rejected = list(csv.DictReader(f))
    assert [(r["split"], Path(r["path"]).name, r["reason"].split(":")[0]) for r in rejected] == [
        ("train", "00000002.jpg", "unreadable"), ("train", "00000001.jpg", "missing")]
    good = [(p, y) for p, y in rows if p not in ("google/q0001/00000002.jpg", "flickr/q0001/00000001.jpg")]
    t = read_split(str(out), "train")
    assert t.column("id").to_pylist() == list(range(len(good)))  # dense over the accepted rows
    assert t.column("label").to_pylist() == [y for _, y in good]
    assert t.column("image").to_pylist() == [(tmp_path / "wv" / p).read_bytes() for p, _ in good]
    m = read_manifest(str(out))
    assert m["totals"]["rejected"] == 2 and m["splits"]["train"]["rejected"] == 2 and m["splits"]["val"]["rows"] == 3


def test_strict_fails_on_first_bad_file(tmp_path, capsys):
    _broken_webvision(tmp_path / "wv")
    out = tmp_path / "out"
    assert prepare("webvision", "--root", tmp_path / "wv", "--out", out, "--strict") == 2
    err = capsys.readouterr().err
    assert "google/q0001/00000002.jpg: unreadable" in err and "--strict" in err
    assert not (out / "manifest.json").exists()


def test_empty_class_folder_fails_naming_it_or_is_left_out_with_dense_labels(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    files = fx.write_folder(src)  # train/ and test/ with cat, dog, emu
    for split in ("train", "test"):
        (src / split / "bee").mkdir()  # sorts first: kept, it would shift every label by one
    (src / "train" / "bee" / "notes.txt").write_text("no images here")
    assert prepare("folder", "--root", src, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{src}/train/bee, {src}/test/bee: empty class folders" in err and "--skip-empty-classes" in err
    assert not out.exists()  # checked before anything is written

    assert prepare("folder", "--root", src, "--out", out, "--skip-empty-classes") == 0
    err = capsys.readouterr().err
    assert f"warning: {src}/train/bee: empty class folder, class 'bee' left out" in err
    assert f"warning: {src}/test/bee: empty class folder" in err and "3 classes remain, numbered 0..2" in err
    m = read_manifest(str(out))
    assert m["classes"] == ["cat", "dog", "emu"] and m["num_classes"] == 3
    assert m["source_info"]["classes_left_out"] == ["bee"]
    for split in ("train", "test"):
        t = read_split(str(out), split)
        assert t.column("label").to_pylist() == [y for _, y in files[split]]  # cat=0, dog=1, emu=2
        assert t.column("image").to_pylist() == [(src / split / p).read_bytes() for p, _ in files[split]]
    assert m["splits"]["train"]["counts"] == [3, 3, 3]

    fx.write(src / "test" / "bee" / "b.jpg", fx.jpeg_bytes(7))  # test images for a class left out of train
    assert prepare("folder", "--root", src, "--out", tmp_path / "out2", "--skip-empty-classes") == 2
    assert f"{src}/test/bee: class 'bee' has images here but none in {src}/train/bee" in capsys.readouterr().err
    assert prepare("digits", "--out", tmp_path / "out3", "--skip-empty-classes") == 2
    assert "--skip-empty-classes: only the folder source" in capsys.readouterr().err


def test_rejection_reasons_are_plain_sentences(tmp_path, capsys):
    src = tmp_path / "src"
    fx.write(src / "cat" / "a.jpg", fx.jpeg_bytes(1))
    bad = fx.write(src / "cat" / "b.jpg", b"these bytes are text, not a JPEG")
    fx.write(src / "dog" / "c.png", fx.png_bytes(2))
    out = tmp_path / "out"
    assert prepare("folder", "--root", src, "--out", out) == 0
    assert "rejected 1 files" in capsys.readouterr().out
    with open(out / "rejected.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["path"], r["reason"]) for r in rows] == [
        (str(bad), "unreadable: not an image (Pillow cannot identify its format)")]

    def plain(text: str) -> bool:
        return not any(s in text for s in ("<", ">", "object at 0x", "Error", "Traceback"))

    assert prepare("folder", "--root", src, "--out", tmp_path / "strict", "--strict") == 2
    err = capsys.readouterr().err
    assert f"{bad}: unreadable: not an image" in err and "--strict" in err and plain(err)
    only_bad = tmp_path / "only_bad"
    fx.write(only_bad / "cat" / "b.jpg", bad.read_bytes())
    assert prepare("folder", "--root", only_bad, "--out", tmp_path / "none") == 2
    err = capsys.readouterr().err  # used to say "see the reasons above" with none above
    assert f"all 1 files were rejected ({only_bad}/cat/b.jpg: unreadable: not an image" in err and plain(err)


def test_root_that_is_a_file_says_so(tmp_path, capsys):
    image = fx.write(tmp_path / "photo.jpg", fx.jpeg_bytes(3))
    out = tmp_path / "out"
    assert prepare("folder", "--root", image, "--out", out) == 2
    assert f"--root {image} is a file, not a folder of class folders" in capsys.readouterr().err
    assert not out.exists()


def test_resume_after_worker_crash_gives_identical_shards(tmp_path, monkeypatch):
    args = ["digits", "--shard-size-mb", 0.02]
    assert prepare(*args, "--out", tmp_path / "ref") == 0
    real, calls = shards_module.write_shard, []

    def crash_on_fourth(job):
        calls.append(job.index)
        if len(calls) == 4:
            raise RuntimeError("simulated worker crash")
        return real(job)

    monkeypatch.setattr(shards_module, "write_shard", crash_on_fourth)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated worker crash"):
        prepare(*args, "--out", out)
    assert not (out / "manifest.json").exists() and len(list((out / "train").glob("part-*.parquet"))) == 3
    monkeypatch.setattr(shards_module, "write_shard", real)
    assert prepare(*args, "--out", out) == 0
    assert read_manifest(str(out))["kept_shards"] == 3
    assert shard_files(out) == shard_files(tmp_path / "ref")


def test_resume_after_lost_manifest_and_damaged_shards(tmp_path):
    args = ["digits", "--shard-size-mb", 0.02]
    assert prepare(*args, "--out", tmp_path / "ref") == 0
    out = tmp_path / "out"
    assert prepare(*args, "--out", out) == 0
    total = read_manifest(str(out))["totals"]["shards"]
    (out / "manifest.json").unlink()
    (out / "train/part-00001.parquet").unlink()
    damaged = out / "train/part-00002.parquet"
    damaged.write_bytes(damaged.read_bytes()[:-10])
    (out / "train/.part-00003.parquet.tmp-deadbeef").write_bytes(b"half a shard")
    untouched = (out / "train/part-00000.parquet").stat().st_mtime_ns
    assert prepare(*args, "--out", out) == 0
    assert read_manifest(str(out))["kept_shards"] == total - 2
    assert (out / "train/part-00000.parquet").stat().st_mtime_ns == untouched
    assert not (out / "train/.part-00003.parquet.tmp-deadbeef").exists()
    assert shard_files(out) == shard_files(tmp_path / "ref")


def test_other_settings_need_overwrite_and_leave_no_stale_shards(tmp_path, capsys):
    out = tmp_path / "out"
    assert prepare("digits", "--out", out, "--shard-size-mb", 0.02) == 0
    assert len(list((out / "train").glob("part-*"))) > 1
    assert prepare("digits", "--out", out, "--seed", 1) == 2
    assert "holds a prepare with other settings" in capsys.readouterr().err
    assert prepare("digits", "--out", out, "--seed", 1, "--overwrite") == 0
    assert sorted(p.name for p in (out / "train").iterdir()) == ["part-00000.parquet"]
    assert sorted(p.name for p in (out / "_state" / "train").iterdir()) == ["part-00000.json"]


def test_bad_options_and_reads_explain_themselves(tmp_path, capsys):
    out = tmp_path / "out"
    for argv, message in [
        (["--noise", "gaussian:0.1"], "unknown kind 'gaussian'"),
        (["--noise", "sym:1.5"], "sym:1.5"),
        (["--imbalance", "0"], "expected 0 < RHO <= 1"),
        (["--splits", "valid"], "digits has splits train, test"),
    ]:
        assert prepare("digits", "--out", out, *argv) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ValueError, match="no manifest.json in .*run the same command again"):
        read_manifest(str(out))
    assert prepare("digits", "--out", out, "--splits", "test") == 0
    with pytest.raises(ValueError, match="no split 'train'; the manifest has test"):
        read_split(str(out), "train")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_long_tailed_noisy_train(tmp_path):
    out = tmp_path / "fm"
    assert prepare("fashion-mnist", "--out", out, "--splits", "train", "--imbalance", 0.01, "--noise", "sym:0.4",
                   "--seed", 0) == 0
    m = read_manifest(str(out))
    assert m["splits"]["train"]["rows"] == 14886  # DESIGN.md section 8
    assert m["imbalance"]["counts_after"] == [6000, 3596, 2156, 1292, 774, 464, 278, 166, 100, 60]
    t = read_split(str(out), "train", columns=["label", "true_label"])
    rate = float(np.mean(t.column("label").to_numpy() != t.column("true_label").to_numpy()))
    assert m["noise"]["actual_rate"] == pytest.approx(rate) and 0.25 < rate < 0.35


@pytest.mark.ray
def test_ray_tasks_write_the_same_shards(tmp_path):
    ray = pytest.importorskip("ray")
    assert prepare("digits", "--out", tmp_path / "ray", "--shard-size-mb", 0.05, "--ray", workers=2) == 0
    assert not ray.is_initialized()  # the runtime prepare started is shut down again
    assert prepare("digits", "--out", tmp_path / "inline", "--shard-size-mb", 0.05) == 0
    assert shard_files(tmp_path / "ray") == shard_files(tmp_path / "inline")
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text())["totals"]["rows"] == 1797


@pytest.mark.ray
def test_ray_mode_starts_ray_through_init_ray_with_token_auth(tmp_path):
    """--ray starts its runtime like training does (pipelines.ray_runtime.init_ray); checked on the live runtime."""
    ray = pytest.importorskip("ray")
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from pipelines.ray_runtime import API_SERVER_ENV, TRAIN_POLL_ENV, TRAIN_POLL_S

    files = fx.write_folder(tmp_path / "src", split_dirs=False)
    bad = fx.write(tmp_path / "src" / "dog" / "bad.jpg", b"not an image")
    paths = [p for p, _ in files["train"]]
    assert not ray.is_initialized()
    with Runner(1, use_ray=True, progress=False) as runner:
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        mode, api, poll = runner.map(os.getenv, [("RAY_AUTH_MODE",), (API_SERVER_ENV,), (TRAIN_POLL_ENV,)], [1, 1, 1],
                                     "env")
        assert mode == "token"  # in the Ray worker processes too
        # init_ray's local start: the State API address it names to every process (plain ray.init sets none), and
        # Ray Train's controller poll (Ray's default 2 s)
        assert api is not None and api == os.environ[API_SERVER_ENV] and api.startswith("http://127.0.0.1:")
        assert poll == TRAIN_POLL_S
        [scanned] = runner.map(scan_files, [(str(tmp_path / "src"), paths, "decode", False)], [len(paths)], "scan")
        assert [problem for _, problem in scanned] == [None] * len(paths)
        with pytest.raises(ValueError) as e:  # --strict in a Ray task: the file and reason, not Ray's traceback
            runner.map(scan_files, [(str(tmp_path / "src"), ["dog/bad.jpg"], "decode", True)], [1], "scan")
        assert str(e.value).startswith(f"{bad}: unreadable") and "ray::" not in str(e.value)
    assert not ray.is_initialized() and API_SERVER_ENV not in os.environ and TRAIN_POLL_ENV not in os.environ


def test_row_order_shuffled_numbers_train_rows_in_a_seeded_random_order(tmp_path):
    # Sources list class by class; `data.shuffle: blocks` keeps a block's rows together, so it needs rows written
    # in a random order (dynloss.data.order). The default keeps source order and the fingerprint it had.
    src = tmp_path / "src"
    files = fx.write_folder(src, per_class=8)
    by_bytes = {(src / "train" / p).read_bytes(): y for p, y in files["train"]}
    assert prepare("folder", "--root", src, "--out", tmp_path / "source") == 0
    runs = read_manifest(str(tmp_path / "source"))["splits"]["train"]
    assert runs["row_order"] == "source" and runs["label_runs"]["same"] > 0.9  # 21 of 23 neighbours: one class
    assert "row_order" not in read_manifest(str(tmp_path / "source"))["settings"]

    for out in ("a", "b"):
        assert prepare("folder", "--root", src, "--out", tmp_path / out, "--row-order", "shuffled") == 0
    m = read_manifest(str(tmp_path / "a"))
    t = read_split(str(tmp_path / "a"), "train")
    assert t.column("id").to_pylist() == list(range(24))  # dense ids, shards in id order
    labels = t.column("label").to_pylist()
    assert [by_bytes[b] for b in t.column("image").to_pylist()] == labels  # each image keeps its label
    assert sorted(labels) == sorted(y for _, y in files["train"]) and labels != sorted(labels)
    entry = m["splits"]["train"]
    assert entry["row_order"] == "shuffled" and entry["counts"] == [8, 8, 8]
    assert entry["label_runs"]["same"] < 0.6 and entry["label_runs"]["chance"] == pytest.approx(1 / 3)
    assert m["splits"]["test"]["row_order"] == "source"  # evaluation order does not matter
    assert read_split(str(tmp_path / "b"), "train").equals(t)  # seeded: the same order again
    # a re-run reuses the saved plan and its shards; the order is the plan's, so the manifest still says so
    assert prepare("folder", "--root", src, "--out", tmp_path / "a", "--row-order", "shuffled") == 0
    again = read_manifest(str(tmp_path / "a"))
    assert again["kept_shards"] == len(entry["shards"]) + len(m["splits"]["test"]["shards"])
    assert again["splits"]["train"]["row_order"] == "shuffled" and read_split(str(tmp_path / "a"), "train").equals(t)
    assert m["fingerprint"] != read_manifest(str(tmp_path / "source"))["fingerprint"]
    check_block_order(str(tmp_path / "a"), "train")  # from the manifest's label_runs
    with pytest.raises(ValueError, match=r"split 'train' holds its classes in runs \(91% .*--row-order shuffled"):
        check_block_order(str(tmp_path / "source"), "train")
