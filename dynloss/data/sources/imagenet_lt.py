"""ImageNet-LT (Liu et al. 2019, "Large-Scale Long-Tailed Recognition in an Open World",
https://github.com/zhmiao/OpenLongTailRecognition-OLTR): 115.8K ImageNet train images, 1280 down to 5 per class.

The split lists `ImageNet_LT_train.txt` (required), `ImageNet_LT_val.txt`, `ImageNet_LT_test.txt` (optional)
hold lines `train/n01440764/n01440764_10026.JPEG 0`, paths relative to `--root` (the ImageNet folder holding
train/ and val/). The lists are looked up in `--lists DIR` if given, else in the root, else in
`root/ImageNet_LT/`. Class names are the WordNet ids read from the paths; a label whose paths disagree on
the WordNet id fails naming the line. The labels are the curated ImageNet ones (true_label = label).

    python -m pipelines.prepare imagenet-lt --root /data/imagenet --lists /data/ImageNet_LT --out /tmp/inlt
"""

from __future__ import annotations

import re

from dynloss.data import storage
from dynloss.data.sources.base import Source, SplitData, parse_file_list

NUM_CLASSES = 1000
_WNID = re.compile(r"^n\d{8}$")


def _lists_dir(fs, base: str, location: str, lists: str | None):
    if lists:
        lfs, lpath = storage.resolve(lists)
        candidates = [(lfs, lpath, str(lists))]
    else:
        candidates = [(fs, base, location), (fs, storage.join(base, "ImageNet_LT"), storage.display(location, "ImageNet_LT"))]
    for cfs, path, shown in candidates:
        if storage.is_file(cfs, storage.join(path, "ImageNet_LT_train.txt")):
            return cfs, path, shown
    where = lists or f"{location} (or {location}/ImageNet_LT; pass --lists DIR if they live elsewhere)"
    raise ValueError(f"ImageNet_LT_train.txt not found in {where}: it should hold ImageNet_LT_{{train,val,test}}.txt")


def read_imagenet_lt(name: str, root: str, lists: str | None = None, **_) -> Source:
    fs, base = storage.resolve(root)
    if not storage.is_dir(fs, base):
        raise ValueError(f"{root} not found: it should be the ImageNet folder the ImageNet-LT lists point into (train/, val/)")
    lfs, ldir, lshown = _lists_dir(fs, base, str(root), lists)
    wnid_of: dict[int, tuple[str, str]] = {}  # label -> (wnid, where first seen)
    splits = {}
    for split in ("train", "val", "test"):
        fname = f"ImageNet_LT_{split}.txt"
        path, shown = storage.join(ldir, fname), storage.display(lshown, fname)
        if split != "train" and not storage.is_file(lfs, path):
            continue
        paths, labels, lines = parse_file_list(lfs, path, shown, NUM_CLASSES)
        for rel, label, lineno in zip(paths, labels.tolist(), lines):
            wnid = next((p for p in rel.split("/")[:-1] if _WNID.match(p)), None)
            if wnid is None:
                continue
            seen = wnid_of.setdefault(label, (wnid, f"{shown}:{lineno}"))
            if seen[0] != wnid:
                raise ValueError(f"{shown}:{lineno}: label {label} is {seen[0]} at {seen[1]} but this path is under {wnid}")
        splits[split] = SplitData(labels=labels, true_labels=labels.copy(), paths=paths, base=str(root))
    classes = [wnid_of[i][0] if i in wnid_of else str(i) for i in range(NUM_CLASSES)]
    return Source(name, classes, splits, image_mode="RGB", image_size=None, encoding="original",
                  info={"lists": lists or lshown})
