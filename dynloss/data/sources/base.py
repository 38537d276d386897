"""What a source reader returns, and the file-list parsing the list-based sources share.

A reader turns one on-disk dataset format into a `Source`: class names and, per split, labels plus either
an array of pixels (encoded losslessly as PNG when sharded) or file paths whose original bytes are kept.

    python -c "from dynloss.data.sources import load_source; print(load_source('digits'))"
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from dynloss.data import storage

UNKNOWN = -1  # true_label when the clean label is not known (real label noise)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class SplitData:
    """One split, rows in source order.

    Exactly one of `images` (N,H,W or N,H,W,C uint8) or `paths` (relative to `base`) is set.
    `true_labels` is a copy of `labels` for clean sources and -1 where the truth is unknown.
    """

    labels: np.ndarray
    true_labels: np.ndarray
    images: np.ndarray | None = None
    paths: list[str] | None = None
    base: str | None = None  # location (path or URI) the relative paths hang off

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.true_labels = np.asarray(self.true_labels, dtype=np.int64)
        n = len(self.labels)
        if (self.images is None) == (self.paths is None):
            raise ValueError("SplitData needs exactly one of images= or paths=")
        size = len(self.images) if self.images is not None else len(self.paths)
        if size != n or len(self.true_labels) != n:
            raise ValueError(f"SplitData: {size} images/paths, {n} labels, {len(self.true_labels)} true labels")

    @property
    def kind(self) -> str:
        return "array" if self.images is not None else "file"

    def __len__(self) -> int:
        return len(self.labels)

    def digest(self) -> str:
        """Content fingerprint of the listing (pixels or paths, and labels), for resuming a prepare."""
        h = hashlib.sha256()
        h.update(self.labels.tobytes())
        h.update(self.true_labels.tobytes())
        if self.images is not None:
            h.update(str(self.images.shape).encode())
            h.update(np.ascontiguousarray(self.images).data)
        else:
            h.update(str(self.base).encode())
            h.update("\n".join(self.paths).encode())
        return h.hexdigest()


@dataclass
class Source:
    name: str
    classes: list[str]
    splits: dict[str, SplitData]
    image_mode: str = "RGB"  # "L" or "RGB"
    image_size: list[int] | None = None  # [h, w] when every image has it
    encoding: str = "png"  # "png" (arrays, encoded losslessly) or "original" (file bytes kept)
    info: dict = field(default_factory=dict)  # reader-specific provenance for the manifest

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"Source({self.name!r}, {self.num_classes} classes, {sizes})"


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Raise naming `where` and the first bad row when a label is outside 0..num_classes-1."""
    labels = np.asarray(labels, dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: row {i} has label {int(labels[i])}, outside 0..{num_classes - 1} "
            f"({bad.size} such rows); check the file belongs to this source"
        )
    if labels.size == 0:
        raise ValueError(f"{where}: no rows (empty source); check the file is complete")
    return labels


def require(fs, path: str, location: str, what: str) -> None:
    """Fail naming a missing file or folder and what it should contain."""
    if storage.file_type(fs, path) == storage.pafs.FileType.NotFound:
        raise ValueError(f"{location} not found: it should be {what}")


def parse_file_list(fs, path: str, location: str, num_classes: int, label_map: dict[str, int] | None = None):
    """Parse a `relative/path label` list (WebVision, ImageNet-LT, ImageNet val.txt).

    The label is an integer, or a class name when `label_map` is given (e.g. a WordNet id).
    Returns (paths, labels, line_numbers); errors name the list file and the 1-based line.
    """
    require(fs, path, location, "a text file of 'relative/path label' lines")
    paths, labels, lines = [], [], []
    for lineno, raw in enumerate(storage.read_text(fs, path).splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)  # paths may hold spaces, the label never does
        if len(parts) != 2:
            raise ValueError(f"{location}:{lineno}: expected 'relative/path label', got {raw!r}")
        rel, token = parts
        try:
            label = int(token)
        except ValueError:
            if label_map is None or token not in label_map:
                known = "" if label_map is None else f" (known class names: {_preview(label_map)})"
                raise ValueError(f"{location}:{lineno}: unknown class {token!r}{known}") from None
            label = label_map[token]
        if not 0 <= label < num_classes:
            raise ValueError(f"{location}:{lineno}: label {label} outside 0..{num_classes - 1}")
        paths.append(rel)
        labels.append(label)
        lines.append(lineno)
    if not paths:
        raise ValueError(f"{location}: the list is empty (empty source)")
    return paths, np.asarray(labels, dtype=np.int64), lines


def _preview(names, n: int = 5) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def image_files(fs, path: str) -> list[str]:
    """Image files under `path` (recursive, sorted, hidden names skipped), relative to `path`."""
    out = []
    for info in storage.list_dir(fs, path, recursive=True):
        if info.type == storage.pafs.FileType.File and info.path.lower().endswith(IMAGE_EXTENSIONS):
            out.append(info.path[len(path.rstrip("/")) + 1 :])
    return out
