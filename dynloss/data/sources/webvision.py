"""WebVision 1.0 (Li et al. 2017, https://data.vision.ee.ethz.ch/cvl/webvision/) and its "mini" subset.

`--root` holds the release as unpacked:
  info/train_filelist_google.txt, info/train_filelist_flickr.txt   lines `google/q0001/00000001.jpg 0`
  info/val_filelist.txt                                             lines `val000001.jpg 0`
  info/synsets.txt (optional)                                       lines `n01440764 tench, Tinca tinca`
Train paths are relative to the root; a val path without a folder is looked up under `val_images_256/`
(then `val_images_resized/`, `val_images/`), as the resized release and DivideMix's loader have it.
Train labels are web labels (real noise, true_label -1); the val set is human-checked (true_label = label).

`webvision-mini` is the usual benchmark subset (Chen et al. 2019; DivideMix, Dynamic Loss): the first 50
classes, Google images only. `--imagenet-val DIR` adds the split `imagenet_val`: the ILSVRC2012 val images of
the same classes, in either layout:
  * flat `ILSVRC2012_val_00000001.JPEG ...` files plus `DIR/val.txt` (`ILSVRC2012_val_00000001.JPEG 65`,
    the label an index in sorted-synset order or a WordNet id such as n01751748);
  * one sub-folder per class, named by WordNet id (mapped through info/synsets.txt) or by class index.

    python -m pipelines.prepare webvision-mini --root /data/webvision --imagenet-val /data/imagenet/val --out /tmp/wv
"""

from __future__ import annotations

import numpy as np

from dynloss.data import storage
from dynloss.data.sources.base import (
    UNKNOWN,
    Source,
    SplitData,
    image_files,
    parse_file_list,
    require,
)

NUM_CLASSES = 1000
MINI_CLASSES = 50
_VAL_DIRS = ("val_images_256", "val_images_resized", "val_images")


def _synsets(fs, root: str, location: str) -> list[str] | None:
    path = storage.join(root, "info", "synsets.txt")
    if not storage.is_file(fs, path):
        return None
    wnids = [line.split()[0] for line in storage.read_text(fs, path).splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids):
        raise ValueError(f"{storage.display(location, 'info/synsets.txt')}: repeated synset ids")
    return wnids


def _list(fs, root, location, name, num_classes, keep):
    rel = f"info/{name}"
    paths, labels, _ = parse_file_list(fs, storage.join(root, rel), storage.display(location, rel), num_classes)
    sel = np.flatnonzero(labels < keep)
    if not sel.size:
        raise ValueError(f"{storage.display(location, rel)}: no rows with a label below {keep} (empty source)")
    return [paths[i] for i in sel], labels[sel]


def _val_prefix(fs, root: str, paths: list[str]) -> list[str]:
    if not paths or "/" in paths[0]:
        return paths
    for d in _VAL_DIRS:
        if storage.is_dir(fs, storage.join(root, d)):
            return [f"{d}/{p}" for p in paths]
    return paths


def read_imagenet_val(location: str, wnids: list[str] | None, num_classes: int, keep: int) -> SplitData:
    """ILSVRC2012 val images of classes 0..keep-1 (layouts in the module docstring)."""
    fs, base = storage.resolve(location)
    require(fs, base, str(location), "the ILSVRC2012 val folder (flat files + val.txt, or one folder per synset)")
    label_map = {w: i for i, w in enumerate(wnids)} if wnids else None
    if storage.is_file(fs, storage.join(base, "val.txt")):
        paths, labels, _ = parse_file_list(
            fs, storage.join(base, "val.txt"), storage.display(location, "val.txt"), num_classes, label_map
        )
    else:
        paths, labels = [], []
        for info in storage.list_dir(fs, base):
            if info.type != storage.pafs.FileType.Directory:
                continue
            name = info.base_name
            if name.isdigit() and int(name) < num_classes:
                label = int(name)
            elif label_map is not None and name in label_map:
                label = label_map[name]
            else:
                hint = "WordNet ids from info/synsets.txt" if label_map else "class indices (add info/synsets.txt to use WordNet ids)"
                raise ValueError(f"{storage.display(location, name)}: unknown class folder; expected {hint}")
            files = image_files(fs, info.path)
            paths += [f"{name}/{f}" for f in files]
            labels += [label] * len(files)
        if not paths:
            raise ValueError(f"{location}: no val.txt and no class folders with images (empty source)")
        labels = np.asarray(labels, dtype=np.int64)
    sel = np.flatnonzero(labels < keep)
    labels = labels[sel]
    return SplitData(labels=labels, true_labels=labels.copy(), paths=[paths[i] for i in sel], base=str(location))


def read_webvision(name: str, root: str, imagenet_val: str | None = None, **_) -> Source:
    fs, base = storage.resolve(root)
    require(fs, storage.join(base, "info"), storage.display(root, "info"),
            "the WebVision info/ folder with train_filelist_google.txt, train_filelist_flickr.txt, val_filelist.txt")
    wnids = _synsets(fs, base, str(root))
    num_classes = len(wnids) if wnids else NUM_CLASSES
    keep = MINI_CLASSES if name == "webvision-mini" else num_classes
    lists = ["train_filelist_google.txt"] + ([] if name == "webvision-mini" else ["train_filelist_flickr.txt"])
    parts = [_list(fs, base, str(root), n, num_classes, keep) for n in lists]
    paths = [p for part in parts for p in part[0]]
    labels = np.concatenate([part[1] for part in parts])
    splits = {"train": SplitData(labels=labels, true_labels=np.full_like(labels, UNKNOWN), paths=paths, base=str(root))}
    vpaths, vlabels = _list(fs, base, str(root), "val_filelist.txt", num_classes, keep)
    splits["val"] = SplitData(labels=vlabels, true_labels=vlabels.copy(), paths=_val_prefix(fs, base, vpaths), base=str(root))
    if imagenet_val:
        splits["imagenet_val"] = read_imagenet_val(imagenet_val, wnids, num_classes, keep)
    classes = (wnids or [str(i) for i in range(num_classes)])[:keep]
    return Source(name, classes, splits, image_mode="RGB", image_size=None, encoding="original",
                  info={"train_lists": lists, "imagenet_val": imagenet_val})
