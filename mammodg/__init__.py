"""mammodg: mammography models that generalise across hospitals and vendors' devices."""
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's start-up chatter out of reports

__version__ = "0.1.0"
