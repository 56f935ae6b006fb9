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
