"""Moving a Backbone between models: :func:`find_backbone` and :func:`load_backbone_weights` (appendix A.2.4:
pre-train the Backbone on patches, then initialise the image classifier's Backbone from it).

The source may be a model holding a :class:`~mammodg.models.vgg.VGGBackbone`, a saved ``.keras`` model, or a
``.weights.h5`` file of such a model; the architectures must match exactly, else the error names the
first mismatching weight and both configurations.
"""
from __future__ import annotations

import os

import keras
import numpy as np

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


def _h5_datasets(group) -> dict[str, tuple[int, ...]]:
    import h5py

    out = {}
    group.visititems(lambda k, v: out.__setitem__(k, tuple(v.shape)) if isinstance(v, h5py.Dataset) else None)
    return out


def _h5_backbone_group(f, path: str):
    """The group of a ``.weights.h5`` file holding the backbone: the root (saved from a bare backbone) or the
    ``layers/<key>`` group with the backbone's ``block_layers``/``head_layers`` (saved from a model holding it)."""
    if "block_layers" in f and "head_layers" in f:
        return f
    candidates = [
        g for g in (f["layers"].values() if "layers" in f else ()) if "block_layers" in g and "head_layers" in g
    ]
    if len(candidates) != 1:
        raise ValueError(
            f"{path}: expected exactly one VGGBackbone in the weights file, found {len(candidates)} "
            f"(top-level groups: {sorted(f.keys())}; layers: {sorted(f['layers'].keys()) if 'layers' in f else []})"
        )
    return candidates[0]


def _backbone_from_file(path: str, like: VGGBackbone) -> VGGBackbone:
    """A new backbone configured like ``like`` holding the backbone weights stored at ``path``."""
    import tempfile

    import h5py

    if not os.path.exists(path):
        raise FileNotFoundError(path)
    if path.endswith(".keras"):
        return find_backbone(keras.saving.load_model(path, compile=False))
    if not path.endswith(".h5"):
        raise ValueError(f"{path}: expected a '.keras' model or a '.weights.h5' weights file")
    if not like.built:
        raise ValueError("the target backbone is not built; call the model on an input (or build it) first")
    skeleton = VGGBackbone.from_config(like.get_config())
    skeleton.build((None, None, None, like.block_layers[0].gamma.shape[0]))
    variables = skeleton.weights
    # mark each variable with its index so the reference file tells which dataset holds which variable
    skeleton.set_weights([np.full(v.shape, i, dtype=v.dtype) for i, v in enumerate(variables)])
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = os.path.join(tmp, "reference.weights.h5")
        skeleton.save_weights(ref_path)
        with h5py.File(ref_path, "r") as ref:
            expected = _h5_datasets(ref)
            index = {k: int(np.asarray(ref[k]).flat[0]) for k in expected}
        src_path = os.path.join(tmp, "source.weights.h5")
        with h5py.File(path, "r") as f:
            group = _h5_backbone_group(f, path)
            found = _h5_datasets(group)
            where = group.name.strip("/")
            if found != expected:
                missing = sorted(set(expected) - set(found))
                extra = sorted(set(found) - set(expected))
                bad = sorted((k for k in set(expected) & set(found) if expected[k] != found[k]), key=index.get)
                detail = (
                    f"{variables[index[bad[0]]].path.split('/', 1)[-1]!r} "
                    f"(stored as {where + '/' if where else ''}{bad[0]}) has shape {found[bad[0]]}, "
                    f"target expects {expected[bad[0]]}"
                    if bad
                    else f"missing weights {missing[:3]}, unexpected weights {extra[:3]}"
                )
                raise ValueError(
                    f"backbone mismatch between {path} and the target ({_describe(like)}): {detail}"
                    f"{f' ({len(bad)} mismatching shapes in all)' if len(bad) > 1 else ''}"
                )
            with h5py.File(src_path, "w") as out:
                for key in group:
                    group.copy(group[key], out, name=key)
        skeleton.load_weights(src_path)
    return skeleton


def load_backbone_weights(classifier, patch_model_or_path) -> VGGBackbone:
    """Copy the Backbone weights (kernels, biases, BatchNorm statistics) into ``classifier``'s Backbone.

    ``patch_model_or_path``: a model containing a :class:`VGGBackbone` (e.g. a trained :func:`patch_classifier`,
    a bare backbone or another :func:`vgg_classifier`), a saved ``.keras`` model, or a ``.weights.h5`` file
    written by ``save_weights`` of such a model. The Backbone architectures must match exactly; otherwise a
    ``ValueError`` names the first mismatching weight and both configurations. Returns the updated Backbone.
    """
    target = find_backbone(classifier)
    if isinstance(patch_model_or_path, (str, os.PathLike)):
        source = _backbone_from_file(os.fspath(patch_model_or_path), like=target)
    else:
        source = find_backbone(patch_model_or_path)
    _check_compatible(source, target)
    target.set_weights(source.get_weights())
    return target
