"""Shared test setup: where the kernels run, and synthetic shards with known tokens.

With CUDA the tests run the compiled kernels on the GPU, against the CPU references (and tests/test_gpu.py
runs); without it, in Triton's CPU interpreter. Chosen here, before anything imports triton (the jit
decorator reads TRITON_INTERPRET when it runs); TRITON_INTERPRET=1 in the environment forces the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from gpuload.shards import write_shard  # noqa: E402


def position_tokens(start: int, count: int, dtype) -> np.ndarray:
    """Token = stream position (uint32) or position mod 65536 (uint16): every batch is computable."""
    positions = np.arange(start, start + count, dtype=np.int64)
    return (positions % (1 << (8 * np.dtype(dtype).itemsize))).astype(dtype)


@pytest.fixture
def make_shards(tmp_path):
    """make_shards([n0, n1, ...], dtype, format) -> list of paths holding a position-token stream."""

    def make(sizes, dtype=np.uint32, format="llmc", prefix="shard", directory=None):
        directory = directory or tmp_path
        os.makedirs(directory, exist_ok=True)
        paths, start = [], 0
        for i, n in enumerate(sizes):
            path = os.path.join(directory, f"{prefix}_{i}.{'npy' if format == 'npy' else 'bin'}")
            write_shard(path, position_tokens(start, n, dtype), format=format)
            paths.append(path)
            start += n
        return paths

    return make
