"""IDX files as distributed for MNIST (LeCun et al., http://yann.lecun.com/exdb/mnist/) and Fashion-MNIST
(Xiao et al. 2017, https://github.com/zalandoresearch/fashion-mnist).

`--root` holds `train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz`,
`t10k-labels-idx1-ubyte.gz` (gzip or not; `train-images.idx3-ubyte` spelling accepted; a `raw/` sub-folder
as torchvision lays them out also works). Format: magic 0x00 0x00 <type 0x08 = ubyte> <ndim>, then ndim
big-endian uint32 sizes, then the data.

    python -m pipelines.prepare fashion-mnist --out /tmp/dl_fmnist --imbalance 0.01 --noise sym:0.4 --seed 0
"""

from __future__ import annotations

import gzip

import numpy as np

from dynloss.data import storage
from dynloss.data.sources.base import Source, SplitData, check_labels

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_CLASSES = {"mnist": [str(i) for i in range(10)], "fashion-mnist": FASHION_CLASSES}
_SPLITS = {"train": "train", "test": "t10k"}


def parse_idx(data: bytes, where: str, ndim: int) -> np.ndarray:
    """Decode one IDX file (gzip detected by its magic bytes) holding unsigned bytes of rank `ndim`."""
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise ValueError(f"{where}: broken gzip stream ({e}); download the file again") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{where}: not an IDX file (magic {data[:4].hex()}, expected 0000 08 0{ndim})")
    if data[2] != 0x08 or data[3] != ndim:
        raise ValueError(f"{where}: IDX type 0x{data[2]:02x} rank {data[3]}, expected unsigned bytes (0x08) of rank {ndim}")
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise ValueError(f"{where}: header says {shape} ({size} bytes) but the file has {len(data) - header} data bytes")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(fs, root: str, location: str, prefix: str, kind: str, ndim: int) -> tuple[str, str]:
    names = [f"{prefix}-{kind}-idx{ndim}-ubyte{gz}" for gz in (".gz", "")] + [f"{prefix}-{kind}.idx{ndim}-ubyte"]
    for sub in ("", "raw"):
        for n in names:
            rel = f"{sub}/{n}" if sub else n
            if storage.is_file(fs, storage.join(root, rel)):
                return storage.join(root, rel), storage.display(location, rel)
    raise ValueError(f"{location}: {names[0]} not found; --root should hold the four IDX files ({', '.join(names[:2])} ...)")


def read_idx(name: str, root: str, **_) -> Source:
    fs, base = storage.resolve(root)
    if not storage.is_dir(fs, base):
        raise ValueError(f"{root} not found: it should be a folder with the {name} IDX files (train-images-idx3-ubyte.gz ...)")
    splits = {}
    for split, prefix in _SPLITS.items():
        ipath, ishown = _find(fs, base, str(root), prefix, "images", 3)
        lpath, lshown = _find(fs, base, str(root), prefix, "labels", 1)
        images = parse_idx(storage.read_bytes(fs, ipath), ishown, 3)
        labels = check_labels(parse_idx(storage.read_bytes(fs, lpath), lshown, 1), 10, lshown)
        if len(images) != len(labels):
            raise ValueError(f"{ishown} has {len(images)} images but {lshown} has {len(labels)} labels")
        splits[split] = SplitData(labels=labels, true_labels=labels.copy(), images=images)
    return Source(name, list(_CLASSES[name]), splits, image_mode="L", image_size=list(splits["train"].images.shape[1:3]))
