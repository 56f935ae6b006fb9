"""The installed package holds every subpackage (an editable install would hide a missing one)."""

import os
import tomllib

from setuptools import find_packages

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_every_subpackage_is_packaged():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        find = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]
    packaged = set(find_packages(where=ROOT, include=find["include"]))
    on_disk = {os.path.relpath(d, ROOT).replace(os.sep, ".")
               for d, _, files in os.walk(os.path.join(ROOT, "gpuload")) if "__init__.py" in files}
    assert on_disk == packaged, f"not packaged: {sorted(on_disk - packaged)}"
    assert "gpuload.kernels" in packaged


def test_the_native_extension_is_built_from_these_sources():
    """setup.py never fails the install over the extension, so a C++ error would only skip the native tests:
    CI requires the build, and a source tree's build must be newer than every source in csrc/."""
    from gpuload import native

    if os.environ.get("CI") == "true":
        assert native.available(), f"CI: the native extension did not build ({native._import_error}); run " \
                                   f"`pip install -v -e .` to see the compiler's error"
    if native.available():
        built = os.path.getmtime(native._module.__file__)
        csrc = os.path.join(ROOT, "csrc")
        stale = [name for name in sorted(os.listdir(csrc)) if os.path.getmtime(os.path.join(csrc, name)) > built]
        assert not stale, f"gpuload/_native is older than csrc/{stale[0]}: rebuild it (pip install -e .)"
