"""Animal-10N (Song et al. 2019, "SELFIE: Refurbishing Unclean Samples for Robust Deep Learning",
https://dm.kaist.ac.kr/datasets/animal-10n/): 50,000 train / 5,000 test 64x64 JPEGs, 10 classes in five
confusable pairs, real human label noise (about 8%).

`--root` holds `training/` and `testing/`, each a flat folder of files named `{label}_{id}.jpg` (e.g.
`3_01234.jpg`); the label comes from the name. Rows follow sorted file names. Train labels are noisy with
unknown truth (true_label -1); the test labels are taken as given (true_label = label).

    python -m pipelines.prepare animal10n --root /data/animal10n --out /tmp/a10n
"""

from __future__ import annotations

import re

import numpy as np

from dynloss.data import storage
from dynloss.data.sources.base import UNKNOWN, Source, SplitData, image_files

CLASSES = ["cat", "lynx", "wolf", "coyote", "cheetah", "jaguar", "chimpanzee", "orangutan", "hamster", "guinea pig"]
_NAME = re.compile(r"^(\d+)_[^/]+$")
_SPLITS = {"train": "training", "test": "testing"}


def read_animal10n(name: str, root: str, **_) -> Source:
    fs, base = storage.resolve(root)
    splits = {}
    for split, folder in _SPLITS.items():
        path, shown = storage.join(base, folder), storage.display(root, folder)
        if not storage.is_dir(fs, path):
            raise ValueError(f"{shown} not found: --root should hold training/ and testing/ with files named {{label}}_{{id}}.jpg")
        files = image_files(fs, path)
        if not files:
            raise ValueError(f"{shown}: no images (empty source)")
        labels = []
        for f in files:
            m = _NAME.match(f)
            if m is None:
                raise ValueError(f"{storage.display(shown, f)}: file name is not {{label}}_{{id}}.jpg; can't tell its class")
            label = int(m.group(1))
            if label >= len(CLASSES):
                raise ValueError(f"{storage.display(shown, f)}: label {label} outside 0..{len(CLASSES) - 1}")
            labels.append(label)
        labels = np.asarray(labels, dtype=np.int64)
        truth = np.full_like(labels, UNKNOWN) if split == "train" else labels.copy()
        splits[split] = SplitData(labels=labels, true_labels=truth, paths=files, base=storage.display(root, folder))
    return Source(name, list(CLASSES), splits, image_mode="RGB", image_size=None, encoding="original")
