"""Patient pseudonyms, image ids, the pseudonym salt and the patient-wise train/validation split (paper section 3.1.1)."""
from __future__ import annotations

import hashlib
import secrets
import stat
import sys
from pathlib import Path

from mammodg.config import ConfigError
from mammodg.io.atomic import create_private

MIN_SALT_CHARS = 16  # shorter salts make pseudonyms a dictionary attack away from the ids
SALT_NAME = ".pseudonym_salt"


def _hash(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def pseudonym(salt: str, source: str, patient_id: str) -> str:
    """Salted SHA-256 of (source, patient id): stable within a build, not reversible without the salt."""
    return _hash(salt, source, patient_id)


def image_id(salt: str, image_path: str) -> str:
    """Salted SHA-256 of the image path: the record's id, stable across resumed builds and configs.

    Mapped back to the path only through ``provenance.csv`` (never inside a record).
    """
    return _hash(salt, "\x1eimage", image_path)


def check_salt(salt: str, where: str) -> str:
    if len(salt) < MIN_SALT_CHARS:
        raise ConfigError(f"{where}: the pseudonym salt has {len(salt)} characters; at least {MIN_SALT_CHARS} are "
                          f"required (a short salt makes the pseudonyms reversible by dictionary)")
    return salt


def warn_if_exposed(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        print(f"mammodg: warning: {path} has mode {mode:04o}; it should be readable by its owner only "
              f"(chmod 600 {path})", file=sys.stderr)


def load_or_create_salt(out_dir: Path, salt: str) -> str:
    """The configured salt, or one kept in ``<out>/.pseudonym_salt`` (created once, mode 0600).

    Salts under ``MIN_SALT_CHARS`` characters are refused, whether configured or read from the file.
    """
    if salt:
        return check_salt(salt, "pseudonym_salt")
    path = Path(out_dir) / SALT_NAME
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            create_private(path, secrets.token_hex(16).encode())
        except FileExistsError:  # another process created it first: read theirs
            pass
    warn_if_exposed(path)
    return check_salt(path.read_text().strip(), str(path))


def split_patients(patients: dict[tuple[str, str], int], val_fraction: float, seed: int) -> dict[tuple[str, str], str]:
    """Assign each (source, pseudonym) to "train" or "val".

    ``patients`` maps (source, pseudonym) to 1 for a malignant patient (any image labelled 1), else 0.
    A patient goes to "val" when a hash of (seed, source, stratum, pseudonym) falls under
    ``val_fraction``: the split of a patient depends only on that patient, the seed and its label
    stratum, so adding or removing patients never moves another one. Each (source, stratum) keeps
    ``val_fraction`` of its patients in expectation (binomial spread: sqrt(n f (1 - f)) patients).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out = {}
    for (source, p), malignant in patients.items():
        h = hashlib.sha256(f"{seed}\x1f{source}\x1f{malignant}\x1f{p}".encode()).digest()
        u = int.from_bytes(h[:8], "little") / 2.0 ** 64
        out[(source, p)] = "val" if u < val_fraction else "train"
    return out
