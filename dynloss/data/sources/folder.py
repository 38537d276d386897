"""A user's own images, one sub-folder per class (the torchvision `ImageFolder` layout).

`--root` is either `root/<class>/**/<image>` (a single split, `train`) or has top folders `train/` and
optionally `val/` and `test/`, each `<split>/<class>/**/<image>`. Classes are the sorted sub-folder names
of the (train) folder; a val/test class folder not among them fails naming it. Image files are those with
the usual extensions (.jpg .jpeg .png .bmp .gif .webp .tif .tiff), any case; hidden names are skipped.
Labels are taken as clean (true_label = label).

    python -m pipelines.prepare folder --root ~/my_images --out /tmp/mine
"""

from __future__ import annotations

import numpy as np

from dynloss.data import storage
from dynloss.data.sources.base import Source, SplitData, image_files

_SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(fs, path: str) -> list[str]:
    return [i.base_name for i in storage.list_dir(fs, path) if i.type == storage.pafs.FileType.Directory]


def read_folder(name: str, root: str, **_) -> Source:
    fs, base = storage.resolve(root)
    if not storage.is_dir(fs, base):
        raise ValueError(f"{root} not found: it should hold one sub-folder of images per class (or train/ and test/ such folders)")
    split_mode = storage.is_dir(fs, storage.join(base, "train"))
    tops = [s for s in _SPLIT_DIRS if storage.is_dir(fs, storage.join(base, s))] if split_mode else [""]
    classes = _class_dirs(fs, storage.join(base, "train") if split_mode else base)
    if not classes:
        raise ValueError(f"{root}: no class sub-folders (empty source)")
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for top in tops:
        path = storage.join(base, top) if top else base
        shown = storage.display(root, top) if top else str(root)
        paths, labels = [], []
        for c in _class_dirs(fs, path):
            if c not in index:
                raise ValueError(f"{storage.display(shown, c)}: unknown class {c!r}; the train classes are {', '.join(classes)}")
            files = image_files(fs, storage.join(path, c))
            paths += [f"{c}/{f}" for f in files]
            labels += [index[c]] * len(files)
        if not paths:
            raise ValueError(f"{shown}: no image files in its class folders (empty source)")
        labels = np.asarray(labels, dtype=np.int64)
        splits[top or "train"] = SplitData(labels=labels, true_labels=labels.copy(), paths=paths, base=shown)
    return Source(name, classes, splits, image_mode="RGB", image_size=None, encoding="original")
