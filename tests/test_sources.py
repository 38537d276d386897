"""Source readers on fixtures written in each real on-disk format (tests/data_fixtures.py), plus the real
Fashion-MNIST files when the Debian package is installed.

    .venv/bin/python -m pytest tests/test_sources.py -q
"""

from __future__ import annotations

import gzip
import os
import pickle
from pathlib import Path

import data_fixtures as fx
import numpy as np
import pytest

from dynloss.data import SOURCES, load_source
from dynloss.data.sources.idx import parse_idx
from dynloss.data.sources.safe_pickle import loads

FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- CIFAR pickles
def test_cifar10_reads_batches_pixels_and_names(tmp_path):
    truth = fx.write_cifar10(tmp_path)
    src = load_source("cifar10", str(tmp_path))
    assert src.classes[:2] == ["airplane", "automobile"] and src.num_classes == 10
    for split in ("train", "test"):
        images, labels = truth[split]
        got = src.splits[split]
        assert got.images.shape == (len(labels), 32, 32, 3) and got.images.dtype == np.uint8
        np.testing.assert_array_equal(got.images, images)  # plane order and row-major layout undone correctly
        np.testing.assert_array_equal(got.labels, labels)
        np.testing.assert_array_equal(got.true_labels, labels)
    assert len(src.splits["train"]) == 5 * 8
    # the root may also be the batch folder itself
    assert len(load_source("cifar10", str(tmp_path / "cifar-10-batches-py")).splits["test"]) == 8


def test_cifar100_uses_fine_labels_and_meta_names(tmp_path):
    truth = fx.write_cifar100(tmp_path)
    src = load_source("cifar100", str(tmp_path))
    assert src.num_classes == 100 and src.classes[7] == "fine7"
    np.testing.assert_array_equal(src.splits["train"].labels, truth["train"][1])
    np.testing.assert_array_equal(src.splits["test"].images, truth["test"][0])


def test_cifar_missing_batch_and_bad_label_name_the_file(tmp_path):
    fx.write_cifar10(tmp_path)
    d = tmp_path / "cifar-10-batches-py"
    batch = pickle.loads((d / "data_batch_2").read_bytes(), encoding="bytes")
    batch[b"labels"][3] = 10
    (d / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_2: row 3 has label 10, outside 0\.\.9"):
        load_source("cifar10", str(tmp_path))
    (d / "data_batch_4").unlink()
    with pytest.raises(ValueError, match="data_batch_4 not found: the cifar10 train split needs data_batch_1"):
        load_source("cifar10", str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_safe_unpickler_refuses_os_system(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fx.write_cifar10(tmp_path)
    evil = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1: refusing to unpickle (posix|os|nt)\.system"):
        load_source("cifar10", str(tmp_path))
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(ValueError, match=r"x\.pkl: refusing to unpickle builtins\.eval"):
        loads(pickle.dumps({b"k": _Reduce(eval, ("1+1",))}, protocol=2), "x.pkl")


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_safe_unpickler_loads_numpy_under_every_protocol():
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for protocol in (2, 3, 4, 5):
        got = loads(pickle.dumps({b"data": arr, b"labels": [1, 2]}, protocol=protocol), "mem")
        np.testing.assert_array_equal(got[b"data"], arr)
    with pytest.raises(ValueError, match="mem: not a readable CIFAR pickle"):
        loads(b"\x80\x02}q\x00", "mem")  # truncated


# ---------------------------------------------------------------- IDX
@pytest.mark.parametrize("gz", [True, False])
def test_idx_reader_gz_and_plain(tmp_path, gz):
    truth = fx.write_idx_set(tmp_path, gz=gz)
    src = load_source("mnist", str(tmp_path))
    assert src.image_mode == "L" and src.image_size == [28, 28]
    for split in ("train", "test"):
        np.testing.assert_array_equal(src.splits[split].images, truth[split][0])
        np.testing.assert_array_equal(src.splits[split].labels, truth[split][1])


def test_idx_checks_magic_and_sizes(tmp_path):
    good = fx.idx_bytes(np.zeros((2, 3, 3), np.uint8))
    assert parse_idx(gzip.compress(good), "f", 3).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="bad.gz: not an IDX file"):
        parse_idx(gzip.compress(b"\x01\x02" + good[2:]), "bad.gz", 3)
    with pytest.raises(ValueError, match="rank 3, expected unsigned bytes .* of rank 1"):
        parse_idx(good, "lab", 1)
    with pytest.raises(ValueError, match="header says"):
        parse_idx(good[:-1], "short", 3)
    fx.write_idx_set(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(fx.idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(ValueError, match="has 10 images but .*t10k-labels-idx1-ubyte.gz has 3 labels"):
        load_source("mnist", str(tmp_path))


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_real_files():
    src = load_source("fashion-mnist")  # default root /usr/share/datasets/fashion-mnist
    train, test = src.splits["train"], src.splits["test"]
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0] and src.classes[9] == "Ankle boot"
    assert int(train.images[0].sum()) == 76247  # the first ankle boot, pixel sum from the published file


# ---------------------------------------------------------------- WebVision
def test_webvision_full_and_mini(tmp_path):
    lists = fx.write_webvision(tmp_path)
    full = load_source("webvision", str(tmp_path))
    assert full.num_classes == 1000 and full.classes[1] == fx.WNIDS[1]
    train = full.splits["train"]
    assert train.paths == [p for p, _ in lists["google"] + lists["flickr"]]  # google then flickr, list order
    assert (train.true_labels == -1).all()  # web labels: truth unknown
    val = full.splits["val"]
    assert val.paths[0] == "val_images_256/val000001.jpg" and (val.true_labels == val.labels).all()

    mini = load_source("webvision-mini", str(tmp_path))
    assert mini.num_classes == 50 and mini.classes == full.classes[:50]
    assert mini.splits["train"].labels.tolist() == [0, 1, 49, 1]  # google only, classes 0..49
    assert mini.splits["val"].labels.tolist() == [1, 0]


def test_webvision_imagenet_val_layouts(tmp_path):
    fx.write_webvision(tmp_path / "wv")
    flat = tmp_path / "inval"
    fx.write_imagenet_val_flat(flat)
    split = load_source("webvision-mini", str(tmp_path / "wv"), imagenet_val=str(flat)).splits["imagenet_val"]
    assert split.paths == ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000003.JPEG"]  # class 60 left out
    assert split.labels.tolist() == [1, 0] and split.base == str(flat)

    tree = tmp_path / "tree"
    fx.write(tree / fx.WNIDS[2] / "ILSVRC2012_val_00000007.JPEG", fx.jpeg_bytes(1))
    fx.write(tree / "3" / "ILSVRC2012_val_00000008.JPEG", fx.jpeg_bytes(2))
    split = load_source("webvision", str(tmp_path / "wv"), imagenet_val=str(tree)).splits["imagenet_val"]
    assert split.labels.tolist() == [3, 2]  # sorted folder order: "3" < "n01484850"
    fx.write(tree / "n12345678" / "x.JPEG", fx.jpeg_bytes(3))
    with pytest.raises(ValueError, match="n12345678: unknown class folder"):
        load_source("webvision", str(tmp_path / "wv"), imagenet_val=str(tree))


def test_webvision_bad_lists_name_file_and_line(tmp_path):
    fx.write_webvision(tmp_path)
    google = tmp_path / "info" / "train_filelist_google.txt"
    google.write_text("google/a.jpg 0\ngoogle/b.jpg 1000\n")
    with pytest.raises(ValueError, match=r"train_filelist_google.txt:2: label 1000 outside 0\.\.999"):
        load_source("webvision", str(tmp_path))
    google.write_text("google/a.jpg 0\n\ngoogle/b.jpg\n")
    with pytest.raises(ValueError, match=r"train_filelist_google.txt:3: expected 'relative/path label'"):
        load_source("webvision", str(tmp_path))
    google.write_text("")
    with pytest.raises(ValueError, match="train_filelist_google.txt: the list is empty"):
        load_source("webvision", str(tmp_path))
    flat = tmp_path / "inval"
    fx.write_imagenet_val_flat(flat)
    (flat / "val.txt").write_text("ILSVRC2012_val_00000001.JPEG n01440764\nILSVRC2012_val_00000002.JPEG n0000bogus\n")
    google.write_text("google/a.jpg 0\n")
    with pytest.raises(ValueError, match=r"val.txt:2: unknown class 'n0000bogus'"):
        load_source("webvision", str(tmp_path), imagenet_val=str(flat))


def test_missing_roots_say_what_they_should_hold(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere/info not found: it should be the WebVision info/ folder"):
        load_source("webvision", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"nowhere not found: it should be a folder with the mnist IDX files"):
        load_source("mnist", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="training not found: --root should hold training/ and testing/"):
        load_source("animal10n", str(tmp_path))
    with pytest.raises(ValueError, match="no CIFAR batches found"):
        load_source("cifar100", str(tmp_path))
    with pytest.raises(ValueError, match="needs --root"):
        load_source("folder")
    with pytest.raises(ValueError, match="unknown source 'imagenet'; choose one of: cifar10, cifar100"):
        load_source("imagenet", str(tmp_path))


# ---------------------------------------------------------------- ImageNet-LT
def test_imagenet_lt_lists(tmp_path):
    lists = fx.write_imagenet_lt(tmp_path)
    src = load_source("imagenet-lt", str(tmp_path))
    assert list(src.splits) == ["train", "val", "test"] and src.num_classes == 1000
    assert src.classes[:3] == fx.WNIDS[:3] and src.classes[3] == "3"
    assert src.splits["train"].paths == [p for p, _ in lists["train"]]
    assert np.bincount(src.splits["train"].labels).tolist() == [3, 2, 1]  # long-tailed, as listed
    # lists elsewhere
    other = tmp_path / "lists"
    other.mkdir()
    (tmp_path / "ImageNet_LT_train.txt").rename(other / "ImageNet_LT_train.txt")
    with pytest.raises(ValueError, match="ImageNet_LT_train.txt not found"):
        load_source("imagenet-lt", str(tmp_path))
    assert len(load_source("imagenet-lt", str(tmp_path), lists=str(other)).splits["train"]) == 6


def test_imagenet_lt_label_wnid_mismatch_names_line(tmp_path):
    fx.write_imagenet_lt(tmp_path)
    lst = tmp_path / "ImageNet_LT_val.txt"
    lst.write_text(lst.read_text() + f"val/{fx.WNIDS[4]}/x.JPEG 0\n")
    with pytest.raises(ValueError, match=r"ImageNet_LT_val.txt:4: label 0 is n01440764 .* under n01494475"):
        load_source("imagenet-lt", str(tmp_path))


# ---------------------------------------------------------------- Animal-10N, folder, digits
def test_animal10n_labels_from_names(tmp_path):
    names = fx.write_animal10n(tmp_path)
    src = load_source("animal10n", str(tmp_path))
    train, test = src.splits["train"], src.splits["test"]
    assert train.paths == sorted(names["train"]) and train.labels.tolist() == [0, 3, 3, 9]
    assert (train.true_labels == -1).all() and test.true_labels.tolist() == test.labels.tolist() == [1, 5]
    assert src.classes[9] == "guinea pig"
    fx.write(tmp_path / "training" / "12_00009.jpg", fx.jpeg_bytes(9))
    with pytest.raises(ValueError, match=r"12_00009.jpg: label 12 outside 0\.\.9"):
        load_source("animal10n", str(tmp_path))
    (tmp_path / "training" / "12_00009.jpg").rename(tmp_path / "training" / "cat.jpg")
    with pytest.raises(ValueError, match="cat.jpg: file name is not"):
        load_source("animal10n", str(tmp_path))


def test_folder_layouts_and_unknown_class(tmp_path):
    files = fx.write_folder(tmp_path / "a")
    fx.write(tmp_path / "a" / "train" / ".hidden" / "x.jpg", b"")  # hidden: skipped
    fx.write(tmp_path / "a" / "train" / "cat" / "notes.txt", b"hi")  # not an image: skipped
    src = load_source("folder", str(tmp_path / "a"))
    assert src.classes == ["cat", "dog", "emu"] and list(src.splits) == ["train", "test"]
    assert list(zip(src.splits["train"].paths, src.splits["train"].labels.tolist())) == files["train"]
    single = load_source("folder", "file://" + str(tmp_path / "a" / "test"))  # a URI root works too
    assert list(single.splits) == ["train"] and len(single.splits["train"]) == len(files["test"])
    fx.write(tmp_path / "a" / "test" / "fox" / "1.jpg", fx.jpeg_bytes(1))
    with pytest.raises(ValueError, match="fox: unknown class 'fox'; the train classes are cat, dog, emu"):
        load_source("folder", str(tmp_path / "a"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files .*empty source"):
        load_source("folder", str(tmp_path / "empty"))


def test_digits_scaled_and_split_by_class():
    src = load_source("digits")
    train, test = src.splits["train"], src.splits["test"]
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (8, 8)
    assert train.images.dtype == np.uint8 and train.images.max() == 255 and train.images.min() == 0
    counts = np.bincount(test.labels)
    assert counts.min() >= 34 and counts.max() <= 36  # every fifth image of each class


def test_registry_lists_every_source():
    assert set(SOURCES) == {"cifar10", "cifar100", "fashion-mnist", "mnist", "webvision", "webvision-mini",
                            "imagenet-lt", "animal10n", "folder", "digits"}
