"""A user's own images, one sub-folder per class (the torchvision `ImageFolder` layout).

`--root` is either `root/<class>/**/<image>` (a single split, `train`) or has top folders `train/` and
optionally `val/` and `test/`, each `<split>/<class>/**/<image>`. Classes are the sorted sub-folder names
of the (train) folder; a val/test class folder not among them fails naming it. Image files are those with
the usual extensions (.jpg .jpeg .png .bmp .gif .webp .tif .tiff), any case; hidden names are skipped.
Labels are taken as clean (true_label = label).

A class folder without image files fails naming it: a class with no examples would still get a label and
an output unit. With `skip_empty_classes=True` (`--skip-empty-classes`) such a train class is left out
instead, the remaining classes numbered densely 0..K-1 in sorted order; `Source.info` maps each empty
folder to its class and lists the classes left out.

    python -m pipelines.prepare folder --root ~/my_images --out /tmp/mine
    python -m pipelines.prepare folder --root ~/my_images --out /tmp/mine --skip-empty-classes
"""

from __future__ import annotations

import numpy as np

from dynloss.data import storage
from dynloss.data.sources.base import IMAGE_EXTENSIONS, Source, SplitData, image_files

_SPLIT_DIRS = ("train", "val", "test")


def _class_dirs(fs, path: str) -> list[str]:
    return [i.base_name for i in storage.list_dir(fs, path) if i.type == storage.pafs.FileType.Directory]


def read_folder(name: str, root: str, skip_empty_classes: bool = False, **_) -> Source:
    fs, base = storage.resolve(root)
    kind = storage.file_type(fs, base)
    if kind == storage.pafs.FileType.File:
        raise ValueError(f"--root {root} is a file, not a folder of class folders; give the folder that holds "
                         "one sub-folder of images per class (or train/ and test/ such folders)")
    if kind != storage.pafs.FileType.Directory:
        raise ValueError(f"{root} not found: it should hold one sub-folder of images per class (or train/ and test/ such folders)")
    split_mode = storage.is_dir(fs, storage.join(base, "train"))
    tops = [s for s in _SPLIT_DIRS if storage.is_dir(fs, storage.join(base, s))] if split_mode else [""]
    found = _class_dirs(fs, storage.join(base, "train") if split_mode else base)
    if not found:
        raise ValueError(f"{root}: no class sub-folders (empty source)")

    # list every split first: which class folders are empty decides the class list and so the labels
    listing = {}  # top -> (shown, {class: files})
    for top in tops:
        path = storage.join(base, top) if top else base
        shown = storage.display(root, top) if top else str(root)
        per_class = {}
        for c in _class_dirs(fs, path):
            if c not in found:
                raise ValueError(f"{storage.display(shown, c)}: unknown class {c!r}; "
                                 f"the train classes are {', '.join(found)}")
            per_class[c] = image_files(fs, storage.join(path, c))
        if not any(per_class.values()):
            raise ValueError(f"{shown}: no image files in its class folders (empty source)")
        listing[top] = (shown, per_class)

    empty = {storage.display(shown, c): c
             for shown, per_class in listing.values() for c, files in per_class.items() if not files}
    if empty and not skip_empty_classes:
        raise ValueError(
            f"{', '.join(empty)}: empty class folder{'s' if len(empty) > 1 else ''} (no image files: "
            f"{' '.join(IMAGE_EXTENSIONS)}); add the images, delete the folder, or pass --skip-empty-classes "
            "to leave an empty train class out (the other classes are then numbered 0..K-1)")
    train_shown, train_files = listing[tops[0]]
    classes = [c for c in found if train_files[c]]
    left_out = [c for c in found if not train_files[c]]
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for top, (shown, per_class) in listing.items():
        paths, labels = [], []
        for c, files in per_class.items():
            if not files:
                continue
            if c not in index:
                raise ValueError(
                    f"{storage.display(shown, c)}: class {c!r} has images here but none in "
                    f"{storage.display(train_shown, c)}, so --skip-empty-classes left it out; add its train images, "
                    f"or remove {storage.display(shown, c)}")
            paths += [f"{c}/{f}" for f in files]
            labels += [index[c]] * len(files)
        labels = np.asarray(labels, dtype=np.int64)
        splits[top or "train"] = SplitData(labels=labels, true_labels=labels.copy(), paths=paths, base=shown)
    info = {"empty_class_folders": empty, "classes_left_out": left_out} if empty else {}
    return Source(name, classes, splits, image_mode="RGB", image_size=None, encoding="original", info=info)
