"""Model registry: ``register(name)`` decorates a model class or builder function, ``build(name, **kwargs)`` calls it.

Registered names (see :mod:`mammodg.models.vgg` and :mod:`mammodg.models.cyclegan`):

* ``"vgg_backbone"``: :class:`~mammodg.models.vgg.VGGBackbone`, the fully convolutional 5-class patch scorer;
* ``"patch_classifier"``: :func:`~mammodg.models.vgg.patch_classifier`, backbone + 5 patch logits (or softmax);
* ``"vgg_classifier"``: :func:`~mammodg.models.vgg.vgg_classifier`, the full 2-level image model (2 logits);
* ``"cyclegan_generator"``: :func:`~mammodg.models.cyclegan.resnet_generator`, the CycleGAN ResNet generator;
* ``"patchgan_discriminator"``: :func:`~mammodg.models.cyclegan.patchgan_discriminator`, the 70x70 PatchGAN;
* ``"resnet50_backbone"``, ``"contrastive_model"``: :mod:`mammodg.models.resnet`, the contrastive encoder;
* ``"fcos"``, ``"fcos_resnet50_features"``, ``"fcos_tiny_features"``: :mod:`mammodg.models.fcos`, the mass detector.

Example::

    from mammodg import models
    model = models.build("vgg_classifier", input_shape=(1152, 832, 1), width=1.0)
"""
from __future__ import annotations

from typing import Callable, TypeVar

_F = TypeVar("_F", bound=Callable)
_REGISTRY: dict[str, Callable] = {}


def register(name: str) -> Callable[[_F], _F]:
    """Decorator registering a model class or builder function under ``name`` (names are unique)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def deco(fn: _F) -> _F:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"model name {name!r} is already registered to {_REGISTRY[name]!r}")
        _REGISTRY[name] = fn
        return fn

    return deco


def names() -> list[str]:
    """Sorted list of registered model names."""
    return sorted(_REGISTRY)


def get(name: str) -> Callable:
    """The class or builder registered under ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(names()) or '(none)'}") from None


def build(name: str, **kwargs):
    """Build the model registered under ``name`` with keyword arguments ``kwargs``."""
    return get(name)(**kwargs)


# Imported last: the model modules use ``register`` from this (by then initialised) package.
from mammodg.models import vgg  # noqa: E402
from mammodg.models import cyclegan, fcos, resnet  # noqa: E402
from mammodg.models.cyclegan import patchgan_discriminator, resnet_generator  # noqa: E402
from mammodg.models.vgg import (  # noqa: E402
    VGGBackbone,
    VGGImageHead,
    malignancy_probability,
    min_input_size,
    patch_classifier,
    vgg_classifier,
)
from mammodg.models.vgg_weights import find_backbone, load_backbone_weights  # noqa: E402

__all__ = [
    "register",
    "build",
    "get",
    "names",
    "vgg",
    "cyclegan",
    "resnet_generator",
    "patchgan_discriminator",
    "VGGBackbone",
    "VGGImageHead",
    "find_backbone",
    "load_backbone_weights",
    "malignancy_probability",
    "min_input_size",
    "patch_classifier",
    "vgg_classifier",
]
