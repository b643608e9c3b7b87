"""The one TFRecord feature spec: every writer and reader derives from ``FIELDS``.

Records are ``tf.train.Example`` protos. They are encoded here without TensorFlow (the builder's
worker processes stay light) and parsed with ``tf.io.parse_single_example``.
"""
from __future__ import annotations

import struct

# name -> (kind, is_list). kind: "bytes" | "int" | "float". Scalars have a default when absent.
FIELDS: dict[str, tuple[str, bool]] = {
    "image": ("bytes", False),  # 16-bit greyscale PNG (encode_png16) of the mammodg.preprocess.stored encoding
    "height": ("int", False),
    "width": ("int", False),
    "label": ("int", False),  # 0 benign / 1 malignant
    "data_segment": ("bytes", False),  # e.g. "S1|VendorA" (values of BuildConfig.segment_keys)
    "split": ("bytes", False),
    "source": ("bytes", False),
    "manufacturer": ("bytes", False),
    "view": ("bytes", False),  # CC | MLO | OTHER | ""
    "laterality": ("bytes", False),  # L | R | "" (of the breast; the image is flipped to chest wall left)
    "patient": ("bytes", False),  # salted-hash pseudonym, never the raw id
    "image_id": ("bytes", False),  # hash of the source file path
    "birads": ("bytes", False),
    "density": ("bytes", False),  # A-D or ""
    "pixel_spacing_mm": ("float", False),  # of the stored image, 0 if unknown
    "scale": ("float", False),
    "flipped": ("int", False),
    "mask_fallback": ("int", False),
    "truncated": ("int", False),
    "breast_fraction": ("float", False),
    "photometric": ("bytes", False),
    "transfer_syntax": ("bytes", False),
    "decoder": ("bytes", False),
    "voi": ("bytes", False),
    "boxes/x_min": ("float", True),  # lesion boxes in stored-image pixels
    "boxes/y_min": ("float", True),
    "boxes/x_max": ("float", True),
    "boxes/y_max": ("float", True),
    "boxes/lesion_class": ("bytes", True),
    "boxes/birads": ("bytes", True),
}


# --- TF-free protobuf encoding (example.proto: Example{Features features=1}, Features{map<string,
# Feature> feature=1}, Feature{BytesList=1 | FloatList=2 | Int64List=3}, packed numeric lists) ---

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _ld(field: int, payload: bytes) -> bytes:
    return _varint((field << 3) | 2) + _varint(len(payload)) + payload


def _feature(kind: str, values) -> bytes:
    if kind == "bytes":
        inner = b"".join(_ld(1, v if isinstance(v, bytes) else str(v).encode()) for v in values)
        return _ld(1, inner)
    if kind == "float":
        packed = struct.pack(f"<{len(values)}f", *values)
        return _ld(2, _ld(1, packed) if values else b"")
    packed = b"".join(_varint(int(v)) for v in values)
    return _ld(3, _ld(1, packed) if values else b"")


def encode_example(features: dict, fields: dict = FIELDS) -> bytes:
    """Serialize a mapping (keys from ``fields``) as a tf.train.Example, keys sorted (deterministic)."""
    unknown = set(features) - set(fields)
    if unknown:
        raise KeyError(f"not in the record schema: {sorted(unknown)}")
    body = b""
    for name in sorted(features):
        kind, is_list = fields[name]
        values = list(features[name]) if is_list else [features[name]]
        entry = _ld(1, name.encode()) + _ld(2, _feature(kind, values))
        body += _ld(1, entry)
    return _ld(1, body)


def encode_png16(image, compress_level: int = 1) -> bytes:
    """A stored uint16 image as the 16-bit greyscale PNG of the ``image`` field."""
    import io

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint16)).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


# --- TensorFlow side ---

def feature_spec(fields: dict = FIELDS):
    import tensorflow as tf

    dtype = {"bytes": tf.string, "int": tf.int64, "float": tf.float32}
    default = {"bytes": "", "int": 0, "float": 0.0}
    return {
        name: tf.io.VarLenFeature(dtype[kind]) if is_list else tf.io.FixedLenFeature([], dtype[kind], default_value=default[kind])
        for name, (kind, is_list) in fields.items()
    }


def parse_fields(serialized, fields: dict):
    """Parse one serialized record of schema ``fields``: lists dense, scalars as they are."""
    import tensorflow as tf

    ex = tf.io.parse_single_example(serialized, feature_spec(fields))
    return {name: tf.sparse.to_dense(ex[name]) if is_list else ex[name] for name, (_, is_list) in fields.items()}


def parse(serialized, decode_image: bool = True):
    """Parse one serialized record; ``image`` becomes a (h, w, 1) uint16 tensor, boxes a (n, 4) float32."""
    import tensorflow as tf

    out = parse_fields(serialized, FIELDS)
    out["boxes"] = tf.stack([out.pop(f"boxes/{k}") for k in ("x_min", "y_min", "x_max", "y_max")], axis=-1)
    out["lesion_class"] = out.pop("boxes/lesion_class")
    out["lesion_birads"] = out.pop("boxes/birads")
    if decode_image:
        out["image"] = tf.io.decode_png(out["image"], channels=1, dtype=tf.uint16)
    return out


def outside_constant(stored, target_mean: float):
    """The model-input value outside the breast: the constant that makes the image mean ``target_mean``."""
    import tensorflow as tf

    from mammodg.preprocess.stored import unit_values_tf

    x = tf.cast(stored, tf.float32)
    n = tf.cast(tf.size(x), tf.float32)
    n_in = tf.reduce_sum(tf.cast(x > 0, tf.float32))
    s_in = tf.reduce_sum(unit_values_tf(x, 0.0))
    return tf.math.divide_no_nan(target_mean * n - s_in, n - n_in)


def model_input(stored, target_mean: float, fill=None):
    """Stored uint16 image -> float32 model input (paper section 3.1.1).

    Inside the breast mask (stored > 0) pixels are their value ``v`` in [0, 1] (:mod:`mammodg.preprocess.stored`);
    outside they take the constant that makes the image mean equal ``target_mean`` (:func:`outside_constant`),
    or ``fill``.
    """
    import tensorflow as tf

    from mammodg.preprocess.stored import unit_values_tf

    x = tf.cast(stored, tf.float32)
    fill = outside_constant(x, target_mean) if fill is None else fill
    return unit_values_tf(x, fill)
