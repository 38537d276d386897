"""Decode encoded image bytes (PNG/JPEG from the shards) into uint8 CHW tensors.

Shard rows keep images encoded (DESIGN.md section 5, "Shards"); this module turns them back into
pixels. torchvision's native decoders (libpng/libjpeg, `torchvision.io.decode_image`) handle PNG,
JPEG, GIF and WebP; anything else (BMP, TIFF, ... from `folder` sources) goes through Pillow. A corrupt
image never raises out of `decode_batch`: it is dropped and reported in the returned mask
(DESIGN.md: "A corrupt image never kills a job: it is dropped and counted").

`decode_batch(..., device="cuda")` decodes the batch's JPEGs on that GPU in one call (nvJPEG through
`torchvision.io.decode_jpeg(device=...)`, as torchvision's reference scripts do); other formats, and a JPEG nvJPEG
refuses (CMYK, progressive ones some versions reject), are decoded on the CPU and copied there.

    .venv/bin/python -c "from dynloss.data.decode import decode_image_bytes; \
import io; from PIL import Image; b = io.BytesIO(); Image.new('RGB', (4, 3)).save(b, 'PNG'); \
print(decode_image_bytes(b.getvalue(), 'L').shape)"
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

# torchvision 0.29 deprecates its image codecs in favour of TorchCodec, which is not a dependency
# here; the codecs still work, so silence only that one message instead of warning per image.
warnings.filterwarnings(
    "ignore", message="The image decoding and encoding capabilities of TorchVision", category=DeprecationWarning
)

#: manifest `image.mode` -> torchvision read mode (channels: L = 1, RGB = 3).
MODES: dict[str, ImageReadMode] = {"L": ImageReadMode.GRAY, "RGB": ImageReadMode.RGB}
CHANNELS: dict[str, int] = {"L": 1, "RGB": 3}

# Magic numbers of the formats torchvision decodes natively. For these a decode failure means the
# bytes are corrupt; only other formats fall back to Pillow.
_JPEG_MAGIC = b"\xff\xd8\xff"
_NATIVE_MAGIC = (b"\x89PNG\r\n\x1a\n", _JPEG_MAGIC, b"GIF87a", b"GIF89a")


class CorruptImageError(ValueError):
    """The bytes could not be decoded as an image (truncated, garbage, unsupported)."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"image mode {mode!r} is not supported; valid modes: {sorted(MODES)} (manifest field image.mode)")
    return mode


def mode_from_manifest(manifest: Mapping | None, default: str = "RGB") -> str:
    """The decode mode a shard set asks for: manifest["image"]["mode"], else `default`."""
    mode = ((manifest or {}).get("image") or {}).get("mode") or default
    return check_mode(mode)


def _is_native(data: bytes) -> bool:
    return data.startswith(_NATIVE_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _decode_pillow(data: bytes, mode: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()  # raises on truncated data (Pillow does not load truncated images by default)
        arr = np.array(im.convert(mode))  # a writable copy (torch warns on read-only buffers)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def decode_image_bytes(data: bytes | bytearray | memoryview | np.ndarray, mode: str = "RGB") -> torch.Tensor:
    """Decode one encoded image to a uint8 tensor [C, H, W] with C = 1 (mode "L") or 3 ("RGB").

    Raises CorruptImageError when the bytes are not a decodable image.
    """
    check_mode(mode)
    if data is None:
        raise CorruptImageError("image bytes are missing (null)")
    data = bytes(data) if not isinstance(data, bytes) else data
    if not data:
        raise CorruptImageError("image bytes are empty")
    try:
        if _is_native(data):
            # bytearray: torch.frombuffer needs a writable buffer to avoid a warning; one copy.
            img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=MODES[mode])
        else:
            img = _decode_pillow(data, mode)
    except Exception as exc:  # libjpeg/libpng/Pillow raise RuntimeError, OSError, SyntaxError, ...
        raise CorruptImageError(f"cannot decode image ({len(data)} bytes): {type(exc).__name__}: {str(exc)[:200]}") from exc
    if img.dtype != torch.uint8:  # 16-bit PNGs decode to uint16
        img = F.to_dtype(img, torch.uint8, scale=True)
    return img


def decode_batch(blobs: Sequence, mode: str = "RGB", device: torch.device | str | None = None
                 ) -> tuple[list[torch.Tensor], np.ndarray]:
    """Decode a batch; never raises for a bad image.

    Returns (images, ok): `images` holds the decodable ones in input order, `ok` is a bool mask over
    the input (ok.sum() == len(images)); the number dropped is `len(blobs) - ok.sum()`. device: where the
    images end up (None: the CPU); on a CUDA device the JPEGs are decoded there (module docstring).
    """
    check_mode(mode)
    device = None if device is None else torch.device(device)
    on_gpu = _gpu_jpegs(blobs, mode, device) if device is not None and device.type == "cuda" else {}
    images: list[torch.Tensor] = []
    ok = np.zeros(len(blobs), dtype=bool)
    for i, data in enumerate(blobs):
        try:
            img = on_gpu[i] if i in on_gpu else decode_image_bytes(data, mode)
        except CorruptImageError:
            continue
        images.append(img if device is None else img.to(device, non_blocking=True))
        ok[i] = True
    return images, ok


def _gpu_jpegs(blobs: Sequence, mode: str, device: torch.device) -> dict[int, torch.Tensor]:
    """The batch's JPEGs decoded on ``device`` in one nvJPEG call, by position in ``blobs``. When the call fails
    (one corrupt or unsupported JPEG fails it), the JPEGs are decoded one by one there and those that fail
    are left to the caller's CPU decode, which tells a corrupt image from one nvJPEG does not take."""
    index = [i for i, b in enumerate(blobs) if b is not None and bytes(b[:3]) == _JPEG_MAGIC]
    if not index:
        return {}
    data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in index]
    try:
        return dict(zip(index, decode_jpeg(data, mode=MODES[mode], device=device)))
    except (RuntimeError, ValueError):  # what torch's image ops raise for bytes nvJPEG cannot decode
        out = {}
        for i, d in zip(index, data):
            try:
                out[i] = decode_jpeg(d, mode=MODES[mode], device=device)
            except (RuntimeError, ValueError):
                continue
        return out
