"""mammodg: mammography models that generalise across hospitals and vendors' devices.

TensorFlow is chosen by an extra: ``pip install 'mammodg[cpu]'`` (tensorflow-cpu) or ``'mammodg[gpu]'``
(tensorflow with CUDA). With ``KERAS_BACKEND=jax`` (or torch) the models and losses import without
TensorFlow, for model-only benchmarks; the data pipeline, trainer and export need TensorFlow.
"""
import importlib.metadata as _metadata
import importlib.util as _util
import os as _os

__version__ = "0.1.0"

TF_DISTRIBUTIONS = ("tensorflow", "tensorflow-cpu")


def _installed(name: str) -> bool:
    try:
        _metadata.distribution(name)
        return True
    except _metadata.PackageNotFoundError:
        return False


def check_tensorflow(installed=_installed, importable=lambda: _util.find_spec("tensorflow") is not None,
                     backend: str | None = None) -> None:
    """Refuse an install with no TensorFlow (unless Keras runs on another backend) or with both
    distributions: ``tensorflow`` and ``tensorflow-cpu`` write the same files, so one breaks the other."""
    both = [d for d in TF_DISTRIBUTIONS if installed(d)]
    if len(both) > 1:
        raise ImportError("mammodg: both tensorflow and tensorflow-cpu are installed and overwrite each other's "
                          "files; keep one: pip uninstall -y tensorflow tensorflow-cpu, then "
                          "pip install 'mammodg[cpu]' or 'mammodg[gpu]'")
    backend = backend if backend is not None else _os.environ.get("KERAS_BACKEND", "tensorflow")
    if backend == "tensorflow" and not importable():
        raise ImportError("mammodg needs TensorFlow: pip install 'mammodg[cpu]' (CPU only) or 'mammodg[gpu]' "
                          "(NVIDIA GPUs); or set KERAS_BACKEND=jax for model-only use")


check_tensorflow()
