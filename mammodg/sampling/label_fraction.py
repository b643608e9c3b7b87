"""Patient-level subsampling of the labelled training data (MSVCL v2, Figure 6: 5 % ... 100 % of labels).

A patient is kept when a salted hash of its pseudonym falls below ``fraction`` of the hash range.
Because the decision depends only on (pseudonym, salt, fraction):

- whole patients are kept or dropped (every record of a patient shares the decision);
- it is deterministic and independent of record order, and needs no file beside the shards;
- it is nested: the patients kept at 0.1 are among those kept at 0.2 (same hash, higher threshold);
- it runs as a ``tf.data`` filter on the records' ``patient`` field (:func:`record_filter`) and on
  a Python list (:func:`subsample`) with the same hash (TensorFlow's keyed SipHash-2-4,
  ``tf.strings.to_hash_bucket_strong``), so both give the same patients.

Not stratified: every patient is kept with probability ``fraction`` whatever its label, so the kept
share of each label is binomial around ``fraction``; at small fractions a rare label can vanish, which
:func:`subsample` reports (``kept_by_label``) so a stage can refuse an empty stream.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Iterable, Sequence

BUCKETS = 2**53  # hash range; a fraction f keeps buckets < round(f * BUCKETS)
DEFAULT_SALT = "mammodg-label-fraction"


def _check(fraction: float) -> float:
    f = float(fraction)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction!r}")
    return f


def _key(salt: str) -> list[int]:
    """The two SipHash key words derived from ``salt`` (63 bits each: TensorFlow's attribute is an int64)."""
    d = hashlib.sha256(f"label_fraction\x1f{salt}".encode()).digest()
    return [int.from_bytes(d[i:i + 8], "little") >> 1 for i in (0, 8)]


def threshold(fraction: float) -> int:
    return int(round(_check(fraction) * BUCKETS))


def patient_buckets(pseudonyms, salt: str = DEFAULT_SALT):
    """Hash bucket in [0, BUCKETS) of each pseudonym (a string tensor or a list): a tf int64 tensor."""
    import tensorflow as tf

    return tf.strings.to_hash_bucket_strong(tf.convert_to_tensor(pseudonyms, tf.string), BUCKETS, _key(salt))


def keep_patient(pseudonym, fraction: float, salt: str = DEFAULT_SALT):
    """tf bool: whether the patient(s) ``pseudonym`` are kept at ``fraction`` (graph-safe)."""
    return patient_buckets(pseudonym, salt) < threshold(fraction)


def record_filter(fraction: float, salt: str = DEFAULT_SALT) -> Callable:
    """A predicate for ``Dataset.filter`` on serialized records: keep the records of kept patients."""
    import tensorflow as tf

    spec = {"patient": tf.io.FixedLenFeature([], tf.string, default_value="")}
    t = threshold(fraction)

    def predicate(serialized):
        patient = tf.io.parse_single_example(serialized, spec)["patient"]
        return patient_buckets(patient, salt) < t

    return predicate


def kept_patients(pseudonyms: Iterable[str], fraction: float, salt: str = DEFAULT_SALT) -> set[str]:
    """The subset of ``pseudonyms`` kept at ``fraction``."""
    unique = sorted(set(pseudonyms))
    if not unique:
        return set()
    keep = keep_patient(unique, fraction, salt).numpy()
    return {p for p, k in zip(unique, keep) if k}


def subsample(items: Sequence, fraction: float, *, salt: str = DEFAULT_SALT,
              patient: Callable = lambda r: r[0], label: Callable | None = None) -> tuple[list, dict]:
    """Keep the items (e.g. ``(pseudonym, record)`` tuples) of kept patients, in their order.

    Returns ``(kept items, summary)``; the summary holds the patient counts before/after and, with
    ``label`` (an item -> label function), ``kept_by_label`` (label -> kept patients having that label).
    """
    keep = kept_patients((patient(r) for r in items), fraction, salt)
    out = [r for r in items if patient(r) in keep]
    summary = {"fraction": float(fraction), "patients": len({patient(r) for r in items}), "kept_patients": len(keep)}
    if label is not None:
        by_label: dict = {}
        for r in items:
            by_label.setdefault(label(r), set())
        for r in out:
            by_label[label(r)].add(patient(r))
        summary["kept_by_label"] = {k: len(v) for k, v in sorted(by_label.items(), key=lambda kv: str(kv[0]))}
    return out, summary


def filter_records(ds, fraction: float, salt: str = DEFAULT_SALT):
    """A dataset of serialized records (any schema with a ``patient`` field) keeping the kept patients'
    records; ``ds`` itself at ``fraction`` 1.0. The one call a downstream stage applies to its labelled
    training stream, before decoding."""
    return ds if _check(fraction) >= 1.0 else ds.filter(record_filter(fraction, salt))
