"""scikit-learn's bundled handwritten digits (UCI optdigits test set, 1,797 8x8 images, 10 classes).

Always available offline, for quick runs. Pixel counts 0..16 are scaled to 0..255 (uint8, grayscale).
No official split exists: within each class, every fifth image in file order (the 5th, 10th, ...) is the
test split (355 images, about 36 per class), the rest train (1,442), so both splits keep the class balance.

    python -m pipelines.prepare digits --out /tmp/dl_digits
"""

from __future__ import annotations

import numpy as np

from dynloss.data.sources.base import Source, SplitData


def read_digits(name: str = "digits", root: str | None = None, **_) -> Source:
    # imported here: scikit-learn is slow to import and only this source needs it
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each image among its class, in file order
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rank[members] = np.arange(len(members))
    test = rank % 5 == 4
    splits = {
        split: SplitData(labels=labels[mask], true_labels=labels[mask].copy(), images=images[mask])
        for split, mask in (("train", ~test), ("test", test))
    }
    return Source(name, [str(i) for i in range(10)], splits, image_mode="L", image_size=[8, 8])
