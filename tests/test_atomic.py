"""mammodg.io.atomic: a file or folder is replaced whole or not at all; private files are 0600 from creation."""
import json
import os
import stat

import pytest

from mammodg.io.atomic import atomic_path, atomic_write_bytes, atomic_write_json, atomic_write_text, create_private


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


def test_file_is_replaced_whole_and_a_failed_write_keeps_the_old_one(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"new" and _leftovers(tmp_path) == []


def test_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "model"
    (out / "variables").mkdir(parents=True)
    (out / "variables" / "stale").write_text("old")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "saved_model.pb").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["saved_model.pb"] and _leftovers(tmp_path) == []


def test_suffix_ends_the_temporary_name(tmp_path):
    with atomic_path(tmp_path / "g.keras", suffix=".keras") as tmp:
        assert tmp.name.endswith(".tmp.keras") and tmp.parent == tmp_path
        tmp.write_text("x")
    assert (tmp_path / "g.keras").read_text() == "x"


def test_json_text_and_private_mode(tmp_path):
    atomic_write_json(tmp_path / "s.json", {"b": [1, 2], "a": None})
    assert json.loads((tmp_path / "s.json").read_text()) == {"b": [1, 2], "a": None}
    assert (tmp_path / "s.json").read_text() == json.dumps({"b": [1, 2], "a": None}, indent=1)
    atomic_write_text(tmp_path / "p.csv", "id\n", private=True)
    assert stat.S_IMODE(os.stat(tmp_path / "p.csv").st_mode) == 0o600 and (tmp_path / "p.csv").read_text() == "id\n"
    with pytest.raises(FileExistsError):  # exclusive creation: a racing second writer never overwrites
        create_private(tmp_path / "p.csv", b"other")
