"""Patient pseudonyms and the patient-wise, source-wise train/validation split (paper section 3.1.1)."""
from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import numpy as np


def pseudonym(salt: str, source: str, patient_id: str) -> str:
    """Salted SHA-256 of (source, patient id): stable within a build, not reversible without the salt."""
    return hashlib.sha256(f"{salt}\x1f{source}\x1f{patient_id}".encode()).hexdigest()[:16]


def load_or_create_salt(out_dir: Path, salt: str) -> str:
    """The configured salt, or one kept in ``<out>/.pseudonym_salt`` (created once, mode 0600)."""
    if salt:
        return salt
    path = Path(out_dir) / ".pseudonym_salt"
    if path.is_file():
        return path.read_text().strip()
    value = secrets.token_hex(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value)
    tmp.chmod(0o600)
    tmp.replace(path)
    return value


def split_patients(patients: dict[tuple[str, str], int], val_fraction: float, seed: int) -> dict[tuple[str, str], str]:
    """Assign each (source, pseudonym) to "train" or "val".

    ``patients`` maps (source, pseudonym) to 1 for a malignant patient (any image labelled 1), else 0.
    Within each source, malignant and benign patients are split separately, so both splits keep the
    source's malignant-patient ratio; the result depends only on the set of patients and the seed.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = {}
    for source in sorted({s for s, _ in patients}):
        for malignant in (0, 1):
            group = sorted(p for (s, p), m in patients.items() if s == source and m == malignant)
            if not group:
                continue
            key = int.from_bytes(hashlib.sha256(f"{seed}|{source}|{malignant}".encode()).digest()[:8], "little")
            order = np.random.default_rng(key).permutation(len(group))
            n_val = int(round(val_fraction * len(group)))
            for rank, idx in enumerate(order):
                out[(source, group[idx])] = "val" if rank < n_val else "train"
    return out
