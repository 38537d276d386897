"""Tiny datasets written in exactly the real on-disk formats, for tests/test_sources.py and tests/test_prepare.py.

CIFAR pickles (protocol 2, bytes keys, as the Python 2 originals load), IDX files written byte by byte,
WebVision / ImageNet-LT file lists over small JPEG trees, Animal-10N named files, a class-folder tree.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361", "n01494475"]


def jpeg_bytes(seed: int, size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def png_bytes(seed: int, size: int = 10) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _pickle(path: Path, obj) -> None:
    write(path, pickle.dumps(obj, protocol=2))


def cifar_images(n: int, seed: int) -> np.ndarray:
    """(n, 32, 32, 3) uint8."""
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _rows(images: np.ndarray) -> np.ndarray:
    # the CIFAR row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    return images.transpose(0, 3, 1, 2).reshape(len(images), 3072)


def write_cifar10(root: Path, per_batch: int = 8, seed: int = 0) -> dict:
    """cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta; returns {split: (images, labels)}."""
    d = root / "cifar-10-batches-py"
    rng = np.random.default_rng(seed)
    out = {"train": ([], []), "test": ([], [])}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = cifar_images(per_batch, seed * 100 + i)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {
            b"batch_label": f"training batch {i + 1} of 5".encode(),
            b"labels": labels,
            b"data": _rows(images),
            b"filenames": [f"img_{i}_{j}.png".encode() for j in range(per_batch)],
        }
        _pickle(d / name, batch)
        split = "test" if name == "test_batch" else "train"
        out[split][0].append(images)
        out[split][1].extend(labels)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    _pickle(d / "batches.meta", {b"num_cases_per_batch": per_batch, b"label_names": names, b"num_vis": 3072})
    return {k: (np.concatenate(v[0]), np.asarray(v[1])) for k, v in out.items()}


def write_cifar100(root: Path, n: int = 30, seed: int = 0) -> dict:
    d = root / "cifar-100-python"
    rng = np.random.default_rng(seed)
    out = {}
    for i, split in enumerate(["train", "test"]):
        images = cifar_images(n, seed * 100 + 50 + i)
        fine = rng.integers(0, 100, n).tolist()
        _pickle(d / split, {
            b"filenames": [f"f{j}.png".encode() for j in range(n)],
            b"batch_label": f"{split} batch".encode(),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
            b"data": _rows(images),
        })
        out[split] = (images, np.asarray(fine))
    _pickle(d / "meta", {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                         b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]})
    return out


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file, byte by byte: 0x00 0x00 0x08 ndim, big-endian sizes, then the unsigned bytes."""
    array = np.asarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", s) for s in array.shape)
    return header + array.tobytes()


def write_idx_set(root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for kind, arr, rank in (("images", images, 3), ("labels", labels, 1)):
            data = idx_bytes(arr)
            name = f"{prefix}-{kind}-idx{rank}-ubyte" + (".gz" if gz else "")
            write(root / name, gzip.compress(data, mtime=0) if gz else data)
        out[split] = (images, labels.astype(np.int64))
    return out


def write_webvision(root: Path, synsets: bool = True) -> dict:
    """A WebVision tree: google (labels 0, 1, 49, 50) and flickr lists, val list + val_images_256/."""
    google = [("google/q0001/00000001.jpg", 0), ("google/q0001/00000002.jpg", 1),
              ("google/q0050/00000001.jpg", 49), ("google/q0051/00000001.jpg", 50),
              ("google/q0001/00000003.jpg", 1)]
    flickr = [("flickr/q0001/00000001.jpg", 0), ("flickr/q0999/00000001.jpg", 999)]
    val = [("val000001.jpg", 1), ("val000002.jpg", 50), ("val000003.jpg", 0)]
    for k, (rel, _) in enumerate(google + flickr):
        write(root / rel, jpeg_bytes(k))
    for k, (rel, _) in enumerate(val):
        write(root / "val_images_256" / rel, jpeg_bytes(100 + k))
    info = root / "info"
    info.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train_filelist_google.txt", google), ("train_filelist_flickr.txt", flickr), ("val_filelist.txt", val)):
        (info / name).write_text("".join(f"{p} {y}\n" for p, y in rows))
    if synsets:
        ids = WNIDS + [f"n9{i:07d}" for i in range(len(WNIDS), 1000)]
        (info / "synsets.txt").write_text("".join(f"{w} class {i}\n" for i, w in enumerate(ids)))
    return {"google": google, "flickr": flickr, "val": val}


def write_imagenet_val_flat(d: Path) -> list[tuple[str, int]]:
    """ILSVRC2012_val_*.JPEG files and a val.txt naming WordNet ids (and one class >= 50)."""
    rows = [("ILSVRC2012_val_00000001.JPEG", WNIDS[1]), ("ILSVRC2012_val_00000002.JPEG", "n90000060"),
            ("ILSVRC2012_val_00000003.JPEG", "0")]
    for k, (name, _) in enumerate(rows):
        write(d / name, jpeg_bytes(200 + k))
    (d / "val.txt").write_text("".join(f"{n} {w}\n" for n, w in rows))
    return rows


def write_imagenet_lt(root: Path) -> dict:
    """An ImageNet tree plus ImageNet_LT_{train,val,test}.txt lists in the root."""
    lists = {
        "train": [(f"train/{WNIDS[c]}/{WNIDS[c]}_{k}.JPEG", c) for c in range(3) for k in range(3 - c)],
        "val": [(f"val/{WNIDS[c]}/ILSVRC2012_val_0000000{c}.JPEG", c) for c in range(3)],
        "test": [(f"val/{WNIDS[c]}/ILSVRC2012_val_0000001{c}.JPEG", c) for c in range(3)],
    }
    k = 0
    for split, rows in lists.items():
        for rel, _ in rows:
            write(root / rel, jpeg_bytes(300 + k))
            k += 1
        (root / f"ImageNet_LT_{split}.txt").write_text("".join(f"{p} {y}\n" for p, y in rows))
    return lists


def write_animal10n(root: Path) -> dict:
    train = ["0_00001.jpg", "3_00002.jpg", "9_00003.jpg", "3_00004.jpg"]
    test = ["1_00001.jpg", "5_00002.jpg"]
    for k, name in enumerate(train):
        write(root / "training" / name, jpeg_bytes(400 + k))
    for k, name in enumerate(test):
        write(root / "testing" / name, jpeg_bytes(450 + k))
    return {"train": train, "test": test}


def write_folder(root: Path, split_dirs: bool = True, per_class: int = 3) -> dict:
    """root/{train,test}/{cat,dog,emu}/*.jpg|png (or root/<class>/ with split_dirs=False)."""
    out = {}
    for s, split in enumerate(["train", "test"] if split_dirs else [""]):
        files = []
        for c, cls in enumerate(["cat", "dog", "emu"]):
            for k in range(per_class - (1 if split == "test" else 0)):
                ext, data = (".png", png_bytes(500 + 100 * s + 10 * c + k)) if k % 2 else (".jpg", jpeg_bytes(500 + 100 * s + 10 * c + k))
                rel = f"{cls}/img{k}{ext}"
                write(root / split / rel if split else root / rel, data)
                files.append((rel, c))
        out[split or "train"] = files
    return out
