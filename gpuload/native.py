"""The optional native extension (csrc/): loaded once, skipped with GPULOAD_NO_NATIVE=1."""

from __future__ import annotations

import os
import warnings

try:
    from gpuload import _native as _module
    _import_error = None
except ImportError as e:  # not built (no compiler at install time) or a stale build
    _module = None
    _import_error = e

_warned = False


def disabled() -> bool:
    return os.environ.get("GPULOAD_NO_NATIVE") == "1"


def available() -> bool:
    """True when the native extension is built and not disabled by GPULOAD_NO_NATIVE=1."""
    return _module is not None and not disabled()


def module():
    """The extension module, or None (with one warning per process when it is missing, not disabled)."""
    global _warned
    if available():
        return _module
    if not disabled() and not _warned:
        _warned = True
        warnings.warn(
            f"gpuload: native extension unavailable ({_import_error}); using the pure-torch CPU gather. "
            f"Reinstall with a C++ compiler present (pip install -e .) for the fast path.",
            RuntimeWarning, stacklevel=3)
    return None
