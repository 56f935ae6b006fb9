"""The machine line every benchmark prints and records: CPU, GPU, driver and library versions."""

from __future__ import annotations

import os
import platform
import subprocess

import numpy as np


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask), not all the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def machine_info() -> dict:
    """Facts about this machine and the libraries in use (GPU fields are None without CUDA)."""
    import torch

    from gpuload import __version__, native

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "cpu": _cpu_model(), "cores": usable_cores(),
        "python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
        "numpy": np.__version__, "gpuload": __version__, "native": native.available(),
        "gpu": None, "gpu_memory_gib": None, "cuda": None, "driver": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    driver=_driver_version())
    return info


def machine_line(info: dict | None = None) -> str:
    """One line for a benchmark's output: 'GPU ... | CPU ... | versions'."""
    info = info or machine_info()
    gpu = (f"GPU: {info['gpu']} ({info['gpu_memory_gib']} GiB, driver {info['driver']}, CUDA {info['cuda']})"
           if info["gpu"] else "GPU: none")
    return (f"{gpu} | CPU: {info['cpu']} ({info['cores']} cores) | python {info['python']}, torch {info['torch']}, "
            f"triton {info['triton']}, numpy {info['numpy']}, gpuload {info['gpuload']} (native: {info['native']})")


def benchmark_result(name: str, argv, json_path: str | None, program: str | None = None, **fields) -> dict:
    """A benchmark's record: its name and exact command, then `fields`; written to `json_path` if given.

    The command is `program` (default: the script's file name) followed by `argv` (default: sys.argv[1:]).
    """
    import json
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    program = os.path.basename(sys.argv[0]) if program is None else program
    result = {"benchmark": name, "command": " ".join([program] + args), **fields}
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
    return result
