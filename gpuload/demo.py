"""`gpuload demo`: write a small synthetic shard set and print a few batches from it."""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import numpy as np

from gpuload.loader import GPULoader
from gpuload.shards import write_shard

DEMO_SHARDS = 3
DEMO_SHARD_TOKENS = 10_000


def write_demo_shards(directory: str) -> list[str]:
    """Three llm.c uint16 shards whose tokens equal their stream position mod 65536 (checkable by eye)."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(DEMO_SHARDS):
        tokens = (np.arange(i * DEMO_SHARD_TOKENS, (i + 1) * DEMO_SHARD_TOKENS) % 65536).astype(np.uint16)
        path = os.path.join(directory, f"demo_train_{i:06d}.bin")
        write_shard(path, tokens)
        paths.append(path)
    return paths


def run_demo(directory: Optional[str] = None, batch_size: int = 4, seq_len: int = 16, steps: int = 3,
             sampling: str = "random", seed: int = 0) -> None:
    if directory is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_demo(tmp, batch_size, seq_len, steps, sampling, seed)
    paths = write_demo_shards(directory)
    print(f"wrote {len(paths)} shards of {DEMO_SHARD_TOKENS} tokens (token = position) to {directory}")
    with GPULoader(paths, batch_size=batch_size, seq_len=seq_len, sampling=sampling, seed=seed) as loader:
        print(loader)
        for _ in range(steps):
            step = loader.step
            x, y = next(loader)
            print(f"step {step}: x {tuple(x.shape)} {x.dtype} on {x.device}, y = x shifted by one token")
            for b in range(min(batch_size, 4)):
                row = [str(t) for t in x[b].tolist()]
                shown = ", ".join(row if len(row) <= 8 else row[:4] + ["..."] + row[-2:])
                print(f"  row {b}: starts at token {row[0]:>6}: [{shown}]")
        print(f"state_dict(): {loader.state_dict()}")
