"""The demo dataset `gpuload bench` runs on: synthetic llm.c shards in a cache directory, reused while intact."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from gpuload.bench import BenchError
from gpuload.progress import Progress
from gpuload.shards import ShardError, TokenStream, open_shard, write_shard

FORMAT = "gpuload.bench.demo/1"
MARKER = "dataset.json"  # written last: a directory without it (or with a stale one) is rewritten
VOCAB = 50257  # GPT-2's vocabulary: the token ids a real uint16 llm.c shard holds
SEED = 0
# (shards, tokens per shard): 400 MB of uint16 tokens, more than a CPU's caches, so every loader reads
# memory rather than cache; --quick takes 4 MB, enough for its small shapes.
SIZES = {"full": (4, 50_000_000), "quick": (2, 1_000_000)}


@dataclass(frozen=True)
class DemoDataset:
    directory: str
    paths: list
    num_tokens: int
    reused: bool  # True when an intact copy from an earlier run was found


def default_cache_dir() -> str:
    """$XDG_CACHE_HOME/gpuload, else ~/.cache/gpuload (a relative XDG_CACHE_HOME is ignored, as the spec says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gpuload")


def _spec(size: str) -> dict:
    shards, shard_tokens = SIZES[size]
    return {"format": FORMAT, "shards": shards, "shard_tokens": shard_tokens, "vocab": VOCAB, "seed": SEED,
            "token_dtype": "uint16"}


def _shard_names(spec: dict) -> list[str]:
    return [f"demo_train_{i:06d}.bin" for i in range(spec["shards"])]


def _problem(directory: str, spec: dict) -> Optional[str]:
    """Why the cached copy in `directory` cannot be reused, or None when it is intact."""
    marker = os.path.join(directory, MARKER)
    if not os.path.exists(marker):
        return "absent" if not os.path.isdir(directory) else f"no {MARKER} (an earlier run did not finish)"
    try:
        with open(marker) as f:
            recorded = json.load(f)
    except (OSError, ValueError) as e:
        return f"{MARKER} unreadable ({e})"
    if not isinstance(recorded, dict) or {k: recorded.get(k) for k in spec} != spec:
        return f"{MARKER} describes another dataset"
    paths = [os.path.join(directory, name) for name in _shard_names(spec)]
    for path in paths:
        try:
            shard = open_shard(path)  # checks the llm.c header against the file size
        except ShardError as e:
            return str(e)
        if shard.format != "llmc" or shard.num_tokens != spec["shard_tokens"]:
            return f"{path}: expected an llm.c shard of {spec['shard_tokens']:,} tokens, found {shard.num_tokens:,}"
    stream = TokenStream(paths)
    try:
        if stream.fingerprint() != recorded.get("fingerprint"):
            return "shard contents changed since they were written"
    finally:
        stream.close()
    return None


def _write(directory: str, spec: dict, quiet: bool) -> list[str]:
    marker = os.path.join(directory, MARKER)
    paths = [os.path.join(directory, name) for name in _shard_names(spec)]
    total = spec["shards"] * spec["shard_tokens"]
    progress = Progress("demo dataset", total=total, quiet=quiet)
    try:
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(marker):
            os.remove(marker)  # first, so that an interrupted rewrite is never taken for an intact copy
        for i, path in enumerate(paths):
            # One generator per shard: the content does not depend on how many shards were written before.
            tokens = np.random.default_rng([spec["seed"], i]).integers(
                0, spec["vocab"], size=spec["shard_tokens"], dtype=np.uint16)
            write_shard(path, tokens)
            progress.update(nbytes=tokens.nbytes, advance=tokens.size, tokens=tokens.size)
        stream = TokenStream(paths)
        try:
            recorded = dict(spec, fingerprint=stream.fingerprint(), files=_shard_names(spec))
        finally:
            stream.close()
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump(recorded, f, indent=1)
        os.replace(tmp, marker)
    except OSError as e:
        progress.abandon()
        raise BenchError(f"{directory}: writing the demo dataset failed ({e.strerror or e}); free space, or "
                         f"choose another --cache-dir") from e
    except BaseException:
        progress.abandon()
        raise
    progress.close()
    return paths


def demo_dataset(cache_dir: Optional[str] = None, quick: bool = False, quiet: bool = False) -> DemoDataset:
    """The demo shards under `cache_dir` (default: default_cache_dir()), written now unless an intact copy exists."""
    size = "quick" if quick else "full"
    spec = _spec(size)
    directory = os.path.join(cache_dir or default_cache_dir(), f"bench-demo-{size}")
    problem = _problem(directory, spec)
    num_tokens = spec["shards"] * spec["shard_tokens"]
    if problem is None:
        return DemoDataset(directory, [os.path.join(directory, n) for n in _shard_names(spec)], num_tokens, True)
    if problem != "absent" and not quiet:
        print(f"gpuload: the cached demo dataset in {directory} cannot be reused ({problem}); writing it again",
              file=sys.stderr)
    return DemoDataset(directory, _write(directory, spec, quiet), num_tokens, False)
