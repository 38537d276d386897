"""Classifiers by name: ``build_model(name, num_classes, in_chans=3, pretrained=False)``.

Every model is a ``Classifier`` (``.features(x) -> (B, D)``, ``.fc``, ``forward = fc(features)``).
Registered: resnet32 (CIFAR), small_cnn (28x28 / 8x8), resnet18/34/50 and vgg19_bn (torchvision),
inception_resnet_v2 (timm). Add one with ``@register_model("name")`` on a builder
``(num_classes, in_chans, pretrained) -> Classifier``.

    python -c "from dynloss.models import build_model, MODELS; print(sorted(MODELS)); print(build_model('small_cnn', 10, in_chans=1))"
"""
from . import resnet_cifar, small_cnn, timm_models, torchvision_models  # noqa: F401  (fill the registry)
from .classifier import Classifier
from .pretrained import PretrainedWeightsError
from .registry import MODELS, build_model, register_model

__all__ = ["MODELS", "Classifier", "PretrainedWeightsError", "build_model", "register_model"]
