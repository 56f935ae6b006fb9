"""Builds gpuload with its optional native extension (gpuload._native).

The extension holds host code only (no CUDA, no torch headers), so it builds wherever a C++17
compiler is found. When it cannot be built, the install still succeeds and gpuload runs its
pure-Python paths; `python -c "import gpuload; print(gpuload.native_available())"` tells which.
"""

import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 is a build requirement; without it we simply skip the extension
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Build the extension when possible; never fail the install because of it."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # compiler missing, headers missing, ...
            print(f"gpuload: native extension not built ({e}); using the pure-Python paths", file=sys.stderr)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"gpuload: native extension not built ({e}); using the pure-Python paths", file=sys.stderr)


ext_modules = []
if os.environ.get("GPULOAD_NO_NATIVE") == "1":
    print("gpuload: GPULOAD_NO_NATIVE=1: native extension not built; using the pure-Python paths", file=sys.stderr)
elif Pybind11Extension is None:
    print("gpuload: pybind11 not found: native extension not built; using the pure-Python paths", file=sys.stderr)
else:
    ext_modules.append(Pybind11Extension(
        "gpuload._native",
        ["csrc/bindings.cpp", "csrc/gather.cpp", "csrc/fault.cpp", "csrc/packing.cpp", "csrc/watch.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
