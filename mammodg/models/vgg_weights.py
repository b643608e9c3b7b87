"""Moving a Backbone between models: :func:`find_backbone` and :func:`load_backbone_weights` (appendix A.2.4:
pre-train the Backbone on patches, then initialise the image classifier's Backbone from it).

The source is a model holding a :class:`~mammodg.models.vgg.VGGBackbone` (build it and ``load_weights`` a
run's ``best.weights.h5`` first); the architectures must match exactly, else the error names the first
mismatching weight and both configurations.
"""
from __future__ import annotations

import keras

from mammodg.models.vgg import VGGBackbone

__all__ = ["find_backbone", "load_backbone_weights"]


def find_backbone(model) -> VGGBackbone:
    """The :class:`VGGBackbone` of ``model``: the model itself, its layer ``"backbone"``, or its only VGGBackbone."""
    if isinstance(model, VGGBackbone):
        return model
    if not isinstance(model, keras.Model):
        raise TypeError(f"expected a keras.Model containing a VGGBackbone, got {type(model).__name__}")
    found = [layer for layer in model.layers if isinstance(layer, VGGBackbone)]
    named = [layer for layer in found if layer.name == "backbone"]
    if len(named) == 1:
        return named[0]
    if len(found) == 1:
        return found[0]
    raise ValueError(
        f"model {model.name!r} has {len(found)} VGGBackbone layers "
        f"({[layer.name for layer in found]}); expected exactly one (named 'backbone')"
    )


def _describe(backbone: VGGBackbone) -> str:
    return f"width={backbone.width:g}, filters={backbone.filters}, head_filters={backbone.head_filters}"


def _check_compatible(source: VGGBackbone, target: VGGBackbone) -> None:
    if not source.built or not target.built:
        which = "source" if not source.built else "target"
        raise ValueError(f"the {which} backbone is not built; call the model on an input (or build it) first")
    sw, tw = source.weights, target.weights
    if len(sw) != len(tw):
        raise ValueError(
            f"backbone mismatch: source has {len(sw)} weight tensors, target {len(tw)} "
            f"(source {_describe(source)}; target {_describe(target)})"
        )
    for s, t in zip(sw, tw):
        s_name, t_name = s.path.split("/", 1)[-1], t.path.split("/", 1)[-1]
        if tuple(s.shape) != tuple(t.shape) or s_name != t_name:
            raise ValueError(
                f"backbone mismatch at {t_name!r}: source {s_name!r} has shape {tuple(s.shape)}, target "
                f"{tuple(t.shape)} (source {_describe(source)}; target {_describe(target)})"
            )


def load_backbone_weights(classifier, source_model) -> VGGBackbone:
    """Copy the Backbone weights (kernels, biases, BatchNorm statistics) into ``classifier``'s Backbone.

    ``source_model``: a model containing a :class:`VGGBackbone` (e.g. a trained :func:`patch_classifier`, a
    bare backbone or another :func:`vgg_classifier`). The Backbone architectures must match exactly;
    otherwise a ``ValueError`` names the first mismatching weight and both configurations. Returns the
    updated Backbone.
    """
    target = find_backbone(classifier)
    source = find_backbone(source_model)
    _check_compatible(source, target)
    target.set_weights(source.get_weights())
    return target
