"""The model registry (dynloss/models): shapes, the features/fc split, ResNet-32's size, offline pretrained.

The ImageNet-size models run one batch-1 forward at the smallest input their architecture takes (32x32;
75x75 for Inception-ResNet-v2), in eval mode, on one thread; most of the file's few seconds is building
vgg19_bn (139M parameters).

    .venv/bin/python -m pytest tests/test_models.py -q
"""
import pickle

import pytest
import torch
from torch import nn

from dynloss.models import MODELS, Classifier, PretrainedWeightsError, build_model
from dynloss.models.torchvision_models import adapt_input_conv

# name -> (in_chans, input size, feature dim)
CASES = {
    "resnet32": (3, 32, 64),
    "small_cnn": (1, 28, 128),
    "resnet18": (3, 32, 512),
    "resnet34": (3, 32, 512),
    "resnet50": (3, 32, 2048),
    "vgg19_bn": (3, 32, 4096),
    "inception_resnet_v2": (3, 75, 1536),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # On a shared 2-core machine torch's 2 intra-op threads spin against the other processes: one thread
    # made these small forwards 10-100x faster here (Inception-ResNet-v2 at 75x75: 4 s -> 0.07 s).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_registered_model_has_a_case():
    assert set(MODELS) == set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shapes_and_forward_is_fc_of_features(name):
    in_chans, size, dim = CASES[name]
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, in_chans=in_chans).eval()
    assert isinstance(model, Classifier) and isinstance(model.fc, nn.Linear)
    assert (model.fc.in_features, model.fc.out_features) == (dim, 7)
    x = torch.randn(1, in_chans, size, size)
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
        both = model(x, return_features=True)
    assert feats.shape == (1, dim) and logits.shape == (1, 7)
    assert torch.allclose(logits, model.fc(feats), atol=1e-5)
    assert torch.allclose(both[0], logits) and torch.allclose(both[1], feats)


def test_resnet32_size_structure_and_training_step():
    model = build_model("resnet32", 10)
    n = sum(p.numel() for p in model.parameters())
    assert 0.45e6 < n < 0.47e6, n  # "0.46M" in He et al. 2016, table 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31 and len(convs) + 1 == 32, "31 convs + fc (option-A shortcuts have no weights)"
    assert [c.out_channels for c in convs[::10]] == [16, 16, 32, 64]
    # Kaiming-normal (fan_in, ReLU gain): std of a 3x3x16 conv's weights about sqrt(2 / 144)
    w = convs[5].weight
    assert abs(w.std().item() - (2 / w[0].numel()) ** 0.5) < 0.02
    # a training-mode batch goes through and gradients reach the first conv
    out = model(torch.randn(2, 3, 16, 16))
    out.logsumexp(1).mean().backward()
    assert convs[0].weight.grad is not None and torch.isfinite(convs[0].weight.grad).all()
    pickle.dumps(model)  # no lambdas: models pickle (Ray object store, torch.save)


def test_small_cnn_any_size_and_param_budget():
    model = build_model("small_cnn", 10, in_chans=1)
    assert 300_000 < sum(p.numel() for p in model.parameters()) < 500_000  # the calibration loop's model
    for size in (8, 28, 3):  # sklearn digits, (Fashion-)MNIST, a degenerate map
        assert model(torch.randn(2, 1, size, size)).shape == (2, 10)
    assert build_model("small_cnn", 5, in_chans=3)(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_in_chans_replaces_first_conv():
    model = build_model("resnet18", 4, in_chans=1).eval()
    assert model.backbone.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 4)
    # the pretrained-conv adaptation keeps the response to a grey image (exactly for 1 or 3k channels)
    w = torch.randn(8, 3, 3, 3)
    grey3, grey1, grey6 = torch.ones(1, 3, 5, 5), torch.ones(1, 1, 5, 5), torch.ones(1, 6, 5, 5)
    ref = nn.functional.conv2d(grey3, w)
    assert torch.allclose(nn.functional.conv2d(grey1, adapt_input_conv(w, 1)), ref, atol=1e-5)
    assert torch.allclose(nn.functional.conv2d(grey6, adapt_input_conv(w, 6)), ref, atol=1e-5)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="resnet32.*small_cnn|small_cnn.*resnet32"):
        build_model("resnet33", 10)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("resnet32", 0)


def test_pretrained_fails_fast_and_clearly_when_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DYNLOSS_OFFLINE", "1")
    with pytest.raises(PretrainedWeightsError, match="resnet18.*not cached.*pretrained=False"):
        build_model("resnet18", 10, pretrained=True)
    with pytest.raises(PretrainedWeightsError, match="inception_resnet_v2.*not cached"):
        build_model("inception_resnet_v2", 10, pretrained=True)
    with pytest.raises(ValueError, match="no pretrained weights"):
        build_model("resnet32", 10, pretrained=True)


def test_pretrained_loads_a_cached_torchvision_checkpoint(tmp_path, monkeypatch):
    # a real checkpoint file in the torch hub cache layout is what an offline machine would have
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("DYNLOSS_OFFLINE", "1")
    torch.manual_seed(1)
    ref = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(ref.state_dict(), cache / url.rsplit("/", 1)[1])
    model = build_model("resnet18", 10, pretrained=True)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    assert model.fc.out_features == 10
    grey = build_model("resnet18", 10, in_chans=1, pretrained=True)
    assert torch.allclose(grey.backbone.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
