"""Decode, augmentation presets and the Ray-free batch path (no Ray runtime).

    .venv/bin/python -m pytest tests/test_decode_transforms.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ingest_shards import digits, encode, write_digits
from torchvision.transforms import v2

from dynloss.data.batches import collate, iter_local_batches, load_split_numpy, views_from_rows, views_on_device
from dynloss.data.decode import decode_batch, decode_image_bytes, mode_from_manifest
from dynloss.data.transforms import PRESETS, Cutout, build_preset, make_views, preset_for_source, view_batch

# torchvision 0.29 deprecates its codecs (pytest re-enables what dynloss.data.decode silences)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

IMAGES, LABELS = digits(64)
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def rgb(img: np.ndarray) -> np.ndarray:
    return np.stack([img, 255 - img, img // 2], axis=-1)


# ------------------------------------------------------------------------------------------------ decode
def test_png_round_trip_is_exact_in_both_modes():
    gray = decode_image_bytes(encode(IMAGES[3], "PNG"), "L")
    assert gray.dtype == torch.uint8 and gray.shape == (1, 8, 8)
    assert np.array_equal(gray[0].numpy(), IMAGES[3])
    color = decode_image_bytes(encode(rgb(IMAGES[3]), "PNG"), "RGB")
    assert color.shape == (3, 8, 8) and np.array_equal(color.permute(1, 2, 0).numpy(), rgb(IMAGES[3]))
    # mode follows the manifest, not the file: an RGB file read as L has one channel, and vice versa
    assert decode_image_bytes(encode(rgb(IMAGES[3]), "PNG"), "L").shape == (1, 8, 8)
    assert np.array_equal(decode_image_bytes(encode(IMAGES[3], "PNG"), "RGB")[2].numpy(), IMAGES[3])


def test_jpeg_and_pillow_only_formats_decode():
    big = np.kron(IMAGES[5], np.ones((4, 4), np.uint8))  # 32x32 so JPEG blocks are meaningful
    jpeg = decode_image_bytes(encode(big, "JPEG"), "RGB")
    assert jpeg.shape == (3, 32, 32) and torch.equal(jpeg[0], jpeg[2])  # gray file expanded to RGB
    assert np.abs(jpeg[0].numpy().astype(int) - big).mean() < 4  # lossy but close
    bmp = decode_image_bytes(encode(IMAGES[5], "BMP"), "L")  # not a torchvision format: Pillow path
    assert np.array_equal(bmp[0].numpy(), IMAGES[5])


def test_corrupt_bytes_are_dropped_and_counted_not_raised():
    png, jpg = encode(IMAGES[0]), encode(rgb(np.kron(IMAGES[1], np.ones((4, 4), np.uint8))), "JPEG")
    blobs = [png, png[: len(png) // 2], jpg, jpg[: len(jpg) // 2], b"not an image", b"", None, encode(IMAGES[2])]
    images, ok = decode_batch(blobs, "L")
    assert ok.tolist() == [True, False, True, False, False, False, False, True]
    assert len(images) == 3 and len(blobs) - ok.sum() == 5
    assert np.array_equal(images[2][0].numpy(), IMAGES[2])


def test_mode_validation_names_the_choices():
    with pytest.raises(ValueError, match=r"'CMYK'.*\['L', 'RGB'\]"):
        decode_image_bytes(encode(IMAGES[0]), "CMYK")
    assert mode_from_manifest({"image": {"mode": "L", "size": [8, 8]}}) == "L"
    assert mode_from_manifest({}) == "RGB"


# ----------------------------------------------------------------------------------------------- presets
INPUT_HW = {"imagenet": (40, 56), "webvision": (40, 56), "imagenet-lt": (40, 56)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_makes_uint8_views_of_its_size_that_normalise_to_the_model_input(name):
    params = {"size": 32} if name in INPUT_HW else {}  # small ImageNet-style size keeps the test fast
    preset = build_preset(name, **params)
    h, w = INPUT_HW.get(name, preset.size)
    images = [torch.randint(0, 256, (preset.channels, h, w), dtype=torch.uint8) for _ in range(4)]
    views = make_views(images, preset, train=True, seed=0)
    assert set(views) == {"weak", "strong"}
    for v in views.values():
        assert v.dtype == torch.uint8 and v.shape == (4, preset.channels, *preset.size)
    assert not torch.equal(views["weak"], views["strong"])
    evals = make_views(images, preset, train=False)
    assert set(evals) == {"x"} and evals["x"].shape == (4, preset.channels, *preset.size)
    # the batch's normalisation is the per-image float conversion + Normalize the views used to end with
    per_image = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(preset.mean), list(preset.std))])
    x = preset.normalise(views["weak"])
    assert x.dtype == torch.float32 and x.shape == views["weak"].shape
    assert torch.allclose(x, torch.stack([per_image(v) for v in views["weak"]]), rtol=0, atol=1e-6)
    # normalised: a mid-gray image lands near zero, not in [0, 255] or [0, 1]
    mid = make_views([torch.full((preset.channels, h, w), 120, dtype=torch.uint8)], preset, train=False)["x"]
    assert preset.normalise(mid).abs().max() < 1.5
    with pytest.raises(ValueError, match="normalises uint8 views"):
        preset.normalise(x)


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar"])
def test_erased_pixels_hold_the_mean_pixel_and_normalise_to_zero(name):
    preset = build_preset(name)
    white = [torch.full((preset.channels, *preset.size), 255, dtype=torch.uint8) for _ in range(16)]
    x = preset.normalise(make_views(white, preset, True, seed=0, views=("strong",))["strong"])
    erased = x.abs().amax(1) < 0.5 / 255 / min(preset.std)  # every channel within half a grey level of the mean
    assert erased.any(1).any(1).sum() >= 4  # Cutout always, RandomErasing at p=0.5: holes in several images
    assert (x[~erased.unsqueeze(1).expand_as(x)] > 0.5).float().mean() > 0.5  # the rest stays bright


def test_seed_makes_views_reproducible_and_leaves_the_global_rng_alone():
    preset = build_preset("cifar")
    images = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8) for _ in range(8)]
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = make_views(images, preset, True, seed=7), make_views(images, preset, True, seed=7)
    c = make_views(images, preset, True, seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a["weak"], b["weak"]) and torch.equal(a["strong"], b["strong"])
    assert not torch.equal(a["strong"], c["strong"])
    weak_only = make_views(images, preset, True, seed=7, views=("weak",))  # what a weak-view train stream makes
    assert list(weak_only) == ["weak"] and torch.equal(weak_only["weak"], a["weak"])
    strong_only = make_views(images, preset, True, seed=7, views=("strong",))  # a meta batch (dynloss.local too)
    assert torch.equal(strong_only["strong"], view_batch(images, preset, "strong", seed=7))
    with pytest.raises(ValueError, match="views must be a non-empty selection"):
        make_views(images, preset, True, views=("x",))


def test_cutout_fills_one_square_of_at_most_16_pixels_a_side():
    torch.manual_seed(0)
    sides = set()
    for _ in range(50):
        out = Cutout(16, (125, 123, 114))(torch.full((3, 32, 32), 255, dtype=torch.uint8))
        ys, xs = torch.nonzero(out[0] == 125, as_tuple=True)
        hy, hx = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert hy <= 16 and hx <= 16 and len(ys) == hy * hx  # one filled rectangle
        assert torch.equal(out[0] == 125, out[2] == 114)  # same hole in every channel, each its own fill
        sides.add((hy, hx))
    assert (16, 16) in sides and len(sides) > 1  # full squares inside, clipped ones at the borders


def test_preset_registry_errors_and_options():
    with pytest.raises(ValueError, match="valid presets"):
        build_preset("cifar-11")
    with pytest.raises(ValueError, match="bad parameters"):
        build_preset("digits", size=3)
    assert build_preset("webvision", size=299).size == (299, 299)
    gray_imagenet = build_preset("imagenet", mode="L", size=32)  # grayscale folder: stats adapted to 1 channel
    assert make_views([torch.zeros(1, 50, 40, dtype=torch.uint8)], gray_imagenet, True)["weak"].shape == (1, 1, 32, 32)
    assert preset_for_source("webvision-mini") == "webvision" and preset_for_source("digits") == "digits"
    with pytest.raises(ValueError, match="expected uint8"):
        make_views([torch.zeros(3, 8, 8, dtype=torch.uint8)], build_preset("digits"), True)


# ------------------------------------------------------------------------------ Ray-free batch path
def test_views_from_rows_counts_corrupt_and_keeps_a_placeholder_for_an_all_corrupt_batch():
    preset = build_preset("digits")
    good, bad = encode(IMAGES[0]), encode(IMAGES[1])[:20]
    rows = {"id": [10, 11, 12], "image": [good, bad, good], "label": [1, 2, 3], "true_label": [1, 2, 3]}
    out = views_from_rows(rows, preset, train=True, seed=0)
    assert out["id"].tolist() == [10, 12] and out["corrupt"].tolist() == [1, 0]
    assert out["weak"].shape == (2, 1, 8, 8)
    all_bad = views_from_rows({"id": [5, 6], "image": [bad, b""], "label": [0, 0], "true_label": [0, 0]}, preset, True)
    assert all_bad["id"].tolist() == [-1] and all_bad["corrupt"].tolist() == [2]
    merged = {k: np.concatenate([out[k], all_bad[k]]) for k in out}
    batch = collate(merged)
    assert batch["id"].tolist() == [10, 12] and int(batch["corrupt"]) == 3 and batch["strong"].shape == (2, 1, 8, 8)


def mixed_rows(n: int = 12) -> dict:
    """Shard rows of 32-px JPEGs (RGB and grey files), a PNG, a truncated JPEG and garbage: what a folder source
    may hold."""
    rng = np.random.default_rng(0)
    blobs = [encode(rgb(np.kron(IMAGES[i], np.ones((4, 4), np.uint8))) if i % 3 else
                    np.kron(IMAGES[i], np.ones((4, 4), np.uint8)), "JPEG") for i in range(n)]
    blobs[4] = encode(rgb(np.kron(IMAGES[4], np.ones((4, 4), np.uint8))), "PNG")
    blobs[5] = blobs[5][: len(blobs[5]) // 2]
    blobs[7] = rng.integers(0, 256, 64, dtype=np.uint8).tobytes()
    return {"id": list(range(100, 100 + n)), "image": blobs, "label": [i % 10 for i in range(n)],
            "true_label": [i % 10 for i in range(n)]}


def test_views_decoded_where_the_batch_is_consumed_equal_those_of_the_decode_tasks():
    """``data.decode_on: device``: the same rows and seed give `collate(views_from_rows(...))` exactly (on the CPU:
    the same decoder), corrupt images dropped and counted; an all-corrupt batch is empty, not a placeholder."""
    preset = build_preset("imagenet", size=24)
    rows = mixed_rows()
    for train, views in ((True, ("weak", "strong")), (True, ("strong",)), (False, ("weak", "strong"))):
        here = views_on_device(rows, preset, train, "cpu", seed=5, views=views)
        there = collate(views_from_rows(rows, preset, train, seed=5, views=views))
        assert set(here) == set(there) and int(here["corrupt"]) == int(there["corrupt"]) == 2
        assert here["id"].tolist() == [i for i in range(100, 112) if i not in (105, 107)]
        for k in here:
            assert torch.equal(here[k], there[k]), (train, views, k)
    bad = {"id": [1, 2], "image": [b"", rows["image"][5]], "label": [0, 0], "true_label": [0, 0]}
    empty = views_on_device(bad, preset, True, "cpu", seed=0, views=("weak",))
    assert int(empty["corrupt"]) == 2 and empty["id"].numel() == 0 and empty["weak"].shape == (0, 3, 24, 24)


def test_seeded_views_reseed_only_the_cpu_generator(monkeypatch):
    """The transforms draw on the CPU; seeding a batch must not reseed the CUDA generators, which the training
    process's dropout and Gumbel noise draw from (``torch.manual_seed`` would, and ``fork_rng(devices=[])`` does not
    restore them). Checked on the call here; `test_gpu_decode_...` checks the CUDA state itself on a GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(seed))
    make_views([torch.zeros(1, 8, 8, dtype=torch.uint8)], build_preset("digits"), True, seed=3)
    view_batch([torch.zeros(1, 8, 8, dtype=torch.uint8)], build_preset("digits"), "strong", seed=3)
    assert calls == []


@CUDA
def test_gpu_decode_matches_the_cpu_within_nvjpeg_rounding_and_leaves_the_cuda_rng_alone():
    device = torch.device("cuda")
    rows = mixed_rows()
    for mode in ("RGB", "L"):
        cpu, ok_cpu = decode_batch(rows["image"], mode)
        gpu, ok_gpu = decode_batch(rows["image"], mode, device=device)
        assert ok_gpu.tolist() == ok_cpu.tolist() and ok_cpu.sum() == 10
        for a, b in zip(cpu, gpu):
            assert b.device.type == "cuda" and b.dtype == torch.uint8 and a.shape == b.shape
            assert (a.float() - b.cpu().float()).abs().mean() < 2.0  # libjpeg-turbo and nvJPEG round differently
    preset = build_preset("imagenet", size=24)
    torch.cuda.manual_seed(11)
    state = torch.cuda.get_rng_state()
    here = views_on_device(rows, preset, True, device, seed=5, views=("weak",))
    assert torch.equal(torch.cuda.get_rng_state(), state)
    there = collate(views_from_rows(rows, preset, True, seed=5, views=("weak",)))
    assert here["weak"].device.type == "cuda" and torch.equal(here["id"], there["id"])
    assert (here["weak"].cpu().float() - there["weak"].float()).abs().mean() < 2.0  # same crops and flips


def test_collate_shares_a_writable_batch_and_copies_a_read_only_one():
    views = np.arange(2 * 1 * 8 * 8, dtype=np.uint8).reshape(2, 1, 8, 8)
    batch = {"id": np.array([3, 4]), "label": np.array([0, 1]), "weak": views, "corrupt": np.array([1, 0])}
    out = collate(batch)  # nothing dropped, writable: the tensors are the arrays
    assert np.shares_memory(out["weak"].numpy(), views) and int(out["corrupt"]) == 1
    frozen = views.copy()
    frozen.flags.writeable = False  # what Ray hands out over the object store's shared memory
    out = collate({**batch, "weak": frozen})
    assert not np.shares_memory(out["weak"].numpy(), frozen)
    out["weak"].add_(1)  # the consumer may write its batch; the source stays as it was
    assert np.array_equal(frozen, views) and torch.equal(out["weak"], torch.from_numpy(views) + 1)
    out = collate({**batch, "id": np.array([3, -1])})  # a placeholder row: dropped, so copied
    assert out["id"].tolist() == [3] and not np.shares_memory(out["weak"].numpy(), views)


def test_local_iterator_covers_the_split_filters_ids_and_reshuffles_each_epoch(tmp_path):
    _images, labels = write_digits(str(tmp_path), n=96, n_shards=3, corrupt_ids=[7])
    root = str(tmp_path)
    seen = [torch.cat([b["id"] for b in iter_local_batches(root, "train", "digits", batch_size=32, epoch=e)])
            for e in (0, 1)]
    assert sorted(seen[0].tolist()) == sorted(set(range(96)) - {7})
    assert not torch.equal(seen[0], seen[1])  # a new order each epoch
    again = torch.cat([b["id"] for b in iter_local_batches(root, "train", "digits", batch_size=32, epoch=0)])
    assert torch.equal(seen[0], again)  # same (seed, epoch): same order
    batches = list(iter_local_batches(root, "train", "digits", train=False, batch_size=40, exclude_ids=np.arange(0, 96, 2)))
    ids = torch.cat([b["id"] for b in batches])
    assert sorted(ids.tolist()) == [i for i in range(1, 96, 2) if i != 7]
    assert sum(int(b["corrupt"]) for b in batches) == 1 and set(batches[0]) == {"id", "label", "true_label", "x", "corrupt"}
    labels_out = torch.cat([b["label"] for b in batches])
    assert np.array_equal(labels_out.numpy(), labels[ids.numpy()])


def test_load_split_numpy_returns_the_written_pixels(tmp_path):
    images, labels = write_digits(str(tmp_path), n=40, corrupt_ids=[3])
    data = load_split_numpy(str(tmp_path), "train")
    keep = np.array([i for i in range(40) if i != 3])
    assert data["corrupt"] == 1 and np.array_equal(data["id"], keep)
    assert data["images"].shape == (39, 1, 8, 8) and np.array_equal(data["images"][:, 0], images[keep])
    assert np.array_equal(data["label"], labels[keep])
