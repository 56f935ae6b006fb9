"""The libraries people install instead of writing a loader, each used the way its documentation shows for
pretraining tokens: torchdata's StatefulDataLoader, litdata, mosaicml-streaming, Grain and HF datasets.

Each peer that keeps its own format gets the bench shards through its own converter once; the copy is
kept in the cache directory (`bench-peers/<peer>-<key>/`, the key covering the shards' paths, sizes,
mtimes and fingerprint, the sequence length, the peer's version) and reused, like the demo dataset;
`conversion.json` is written last and records the converter's seconds. Peers that store fixed blocks of
T+1 tokens (litdata's TokensLoader, MDS, an Arrow table of blocks) read those blocks shuffled; the others
read random windows of the shards in place. Every loader runs min(4, cores) worker processes, pins its
batches on CUDA, and the batch is widened to int64 where the peer's examples do it (after the copy to the
device for narrow tokens): x = block[:, :-1], y = block[:, 1:].

A peer that cannot be imported is skipped with the reason (`PeerProvider.unavailable`).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import sys
import time
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from gpuload.bench import BenchError
from gpuload.bench.dataset import default_cache_dir
from gpuload.bench.providers import DATALOADER_WORKERS, Provider, RandomWindows
from gpuload.machine import usable_cores
from gpuload.shards import TokenStream

CONVERSION_FORMAT = "gpuload.bench.peer-conversion/2"
CONVERSION_MARKER = "conversion.json"  # written last: a directory without it is converted again
BLOCKS_PER_READ = 1024  # blocks of T+1 tokens read from the stream at a time by the converters that write blocks
LITDATA_PIECE_TOKENS = 1 << 20  # tokens per item handed to litdata's optimize (a document's worth, or several)
# litdata gives each (rank, worker) whole chunks and fails (IndexError in a worker) when one gets none: at least
# 4 ranks x 4 workers of chunks, even on the audit's 2M tokens.
LITDATA_MIN_CHUNKS = 16
INSTALL = 'pip install -e ".[peers]"'  # torchdata, Grain, HF datasets: beside a CPU torch, none replaces it


def workers() -> int:
    """Worker processes per peer loader: the same min(4, cores) as the torch DataLoader provider."""
    return min(DATALOADER_WORKERS, usable_cores())


@dataclass(frozen=True)
class Converted:
    """A peer's converted copy of the shards: where it is, how long its converter took, whether it was reused."""

    directory: str
    seconds: float
    reused: bool


@contextmanager
def _stdout_to_stderr():
    """Converters print progress on stdout (litdata from its worker processes too): keep stdout for the table.
    Both Python's sys.stdout and file descriptor 1, which the worker processes inherit."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _dataset_key(peer: str, shards, seq_len: Optional[int]) -> dict:
    stream = TokenStream([s.path for s in shards], token_dtype=shards[0].dtype)
    try:
        fingerprint = stream.fingerprint()
    finally:
        stream.close()
    files = []
    for s in shards:
        st = os.stat(s.path)
        files.append([os.path.abspath(s.path), st.st_size, st.st_mtime_ns])
    return {"format": CONVERSION_FORMAT, "peer": peer, "version": importlib.metadata.version(PEERS[peer].distribution),
            "seq_len": seq_len, "fingerprint": fingerprint, "files": files}


def convert_once(peer: str, shards, seq_len: Optional[int], cache_dir: Optional[str], convert) -> Converted:
    """The converted copy of `shards` for `peer`: reused when intact, else `convert(directory)` is run and timed."""
    key = _dataset_key(peer, shards, seq_len)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir or default_cache_dir(), "bench-peers", f"{peer}-{digest}")
    data, marker = os.path.join(root, "data"), os.path.join(root, CONVERSION_MARKER)
    try:
        with open(marker) as f:
            recorded = json.load(f)
        if recorded.get("key") == key:
            return Converted(data, float(recorded["seconds"]), True)
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, or an interrupted or older conversion: convert again
    try:
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
        method = multiprocessing.get_start_method(allow_none=True)
        start = time.perf_counter()
        try:
            with _stdout_to_stderr():
                convert(data)
        finally:
            # litdata's optimize forces the process-wide start method to spawn, which would turn every later
            # DataLoader's forked workers into spawned ones (1.4 s to a first batch instead of 0.05 s here).
            multiprocessing.set_start_method(method, force=True)
        seconds = time.perf_counter() - start
        tmp = marker + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"key": key, "seconds": seconds}, f, indent=1)
        os.replace(tmp, marker)
    except OSError as e:
        raise BenchError(f"{root}: converting the bench shards for {peer} failed ({e.strerror or e}); free space, "
                         f"or choose another --cache-dir") from e
    return Converted(data, seconds, False)


def stream_blocks(paths, token_dtype, length: int):
    """Consecutive blocks of `length` tokens of the shards' stream (the last partial block dropped), as a
    tokenizer's group_texts / ConcatTokens step produces them."""
    stream = TokenStream(paths, token_dtype=token_dtype)
    try:
        count = len(stream) // length
        for first in range(0, count, BLOCKS_PER_READ):
            take = min(BLOCKS_PER_READ, count - first)
            yield from stream.read(first * length, take * length).reshape(take, length)
    finally:
        stream.close()


def split_blocks(block: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) tokens (pinned on CUDA) -> x, y int64 (B, T) on `device`, contiguous."""
    if device.type == "cuda":
        block = block.to(device, non_blocking=True)
    return block[:, :-1].to(torch.int64).contiguous(), block[:, 1:].to(torch.int64).contiguous()


def shutdown(iterator) -> None:
    """Stop a DataLoader iterator's workers now: left to the garbage collector, idle workers could outlive
    the provider and share the cores with the next one's timing (DataLoader has no public close)."""
    stop = getattr(iterator, "_shutdown_workers", None)
    if stop is not None:
        stop()


class PeerProvider(Provider):
    """A provider backed by a library that may not be installed."""

    module = ""  # what is imported
    distribution = ""  # the package pip installs
    install = INSTALL  # how
    no_state = None

    @classmethod
    def unavailable(cls) -> Optional[str]:
        """Why this peer cannot run here (its import fails), or None when it can."""
        try:
            importlib.import_module(cls.module)
        except Exception as e:  # a missing package, or one whose own imports fail (mosaic needs torchvision)
            first = str(e).splitlines()[0] if str(e) else ""
            return f"import {cls.module} failed ({type(e).__name__}: {first}); install it: {cls.install}"
        return None

    @classmethod
    def convert(cls, shards, seq_len: int, cache_dir: Optional[str]) -> Optional[Converted]:
        """The peer's converted copy of `shards` (None for a peer that reads the shards in place)."""
        return None


class LoaderPeer(PeerProvider):
    """A peer whose loader is an iterable with state_dict()/load_state_dict() (torchdata's StatefulDataLoader,
    litdata's and mosaic's StreamingDataLoader): the iterator is made on the first batch, so a state loaded
    before then is where it starts, and close() stops its workers."""

    loader = None
    iterator = None

    def batch(self, item):
        """(x, y) on the device from one item of the loader."""
        raise NotImplementedError

    def __call__(self):
        if self.iterator is None:
            self.iterator = iter(self.loader)
        return self.batch(next(self.iterator))

    def state_dict(self):
        if self.no_state:
            return super().state_dict()
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        if self.no_state:
            super().load_state_dict(state)
            return
        self.loader.load_state_dict(state)

    def close(self) -> None:
        iterator, self.iterator = self.iterator, None
        shutdown(iterator)


class TorchData(LoaderPeer):
    """torchdata's StatefulDataLoader, its drop-in replacement for DataLoader: the torch-dataloader provider's
    Dataset and sampler, with state_dict(); on several ranks its StatefulDistributedSampler, as its docs say."""

    name = "torchdata"
    module = distribution = "torchdata"

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0, rank: int = 0,
                 world_size: int = 1, **options):
        from torchdata.stateful_dataloader import StatefulDataLoader
        from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

        dataset = RandomWindows(shards, seq_len)
        if world_size == 1:
            sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=1 << 40,
                                                     generator=torch.Generator().manual_seed(seed))
        else:
            sampler = StatefulDistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                                 drop_last=True)
        self.device = device
        self.loader = StatefulDataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                         num_workers=workers(), pin_memory=device.type == "cuda")

    def batch(self, item):
        x, y = item
        if self.device.type == "cuda":
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y


def _litdata_items(shard):
    """litdata's optimize fn: one input (a shard) -> token tensors, as litgpt's prepare scripts yield documents."""
    path, offset, count, dtype = shard
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
    for start in range(0, count, LITDATA_PIECE_TOKENS):
        yield torch.from_numpy(np.array(tokens[start:start + LITDATA_PIECE_TOKENS]))


class LitData(LoaderPeer):
    """litdata: `optimize(..., item_loader=TokensLoader())` once, then StreamingDataset(TokensLoader(block_size=
    T+1), shuffle=True, drop_last=True) through StreamingDataLoader, as its README's LLM pretraining example.
    Rank and world size come from the environment (WORLD_SIZE, GLOBAL_RANK) or torch.distributed."""

    name = "litdata"
    module = distribution = "litdata"
    install = ("pip install --no-deps litdata, then its requirements but torchvision (its torchvision pulls a "
               "CUDA torch; README, peers)")
    sampling = "shuffled blocks"

    @classmethod
    def convert(cls, shards, seq_len, cache_dir):
        def run(directory):
            from litdata import TokensLoader, optimize

            inputs = [(s.path, s.offset, s.num_tokens, str(s.dtype)) for s in shards]
            # chunk_size as the README's example, (block_size) * 8012 tokens (16 MB of uint16 at T=1024), or
            # fewer blocks where the data would make fewer than LITDATA_MIN_CHUNKS chunks
            blocks = sum(s.num_tokens for s in shards) // (seq_len + 1)
            chunk_blocks = max(1, min(8012, blocks // LITDATA_MIN_CHUNKS))
            optimize(fn=_litdata_items, inputs=inputs, output_dir=directory, chunk_size=(seq_len + 1) * chunk_blocks,
                     item_loader=TokensLoader())

        return convert_once(cls.name, shards, seq_len, cache_dir, run)

    @classmethod
    def rank_env(cls, rank, world_size):
        return {"WORLD_SIZE": str(world_size), "GLOBAL_RANK": str(rank)}

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0,
                 cache_dir: Optional[str] = None, **options):
        from litdata import StreamingDataLoader, StreamingDataset, TokensLoader

        self.conversion = self.convert(shards, seq_len, cache_dir)
        self.device = device
        dataset = StreamingDataset(self.conversion.directory, item_loader=TokensLoader(block_size=seq_len + 1),
                                   shuffle=True, drop_last=True, seed=seed)
        self.loader = StreamingDataLoader(dataset, batch_size=batch_size, num_workers=workers(),
                                          pin_memory=device.type == "cuda")

    def batch(self, item):
        return split_blocks(item, self.device)


class MosaicStreaming(LoaderPeer):
    """mosaicml-streaming: MDSWriter of T+1-token blocks (llm-foundry's concatenated-tokens conversion, an
    ndarray column), then StreamingDataset(local=..., shuffle=True, batch_size=B) with its default shuffle
    (py1e) through StreamingDataLoader. Ranks come from RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE."""

    name = "mosaic-streaming"
    module, distribution = "streaming", "mosaicml-streaming"
    install = ("pip install --no-deps mosaicml-streaming and its requirements; `import streaming` needs a "
               "torchvision built for this torch, which PyPI has only for CUDA torch (README, peers)")
    sampling = "shuffled blocks"
    ranks_in_processes = True

    @classmethod
    def convert(cls, shards, seq_len, cache_dir):
        def run(directory):
            from streaming import MDSWriter

            column = f"ndarray:{np.dtype(shards[0].dtype).name}:{seq_len + 1}"
            with MDSWriter(out=directory, columns={"tokens": column}, compression=None) as writer:
                for block in stream_blocks([s.path for s in shards], shards[0].dtype, seq_len + 1):
                    writer.write({"tokens": block})

        return convert_once(cls.name, shards, seq_len, cache_dir, run)

    @classmethod
    def rank_env(cls, rank, world_size):
        return {"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                "LOCAL_WORLD_SIZE": str(world_size)}

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0,
                 cache_dir: Optional[str] = None, **options):
        from streaming import StreamingDataLoader, StreamingDataset
        from streaming.base.util import clean_stale_shared_memory

        self.conversion = self.convert(shards, seq_len, cache_dir)
        self.device = device
        clean_stale_shared_memory()  # the docs' advice: a killed run leaves its shared memory behind
        self.dataset = StreamingDataset(local=self.conversion.directory, shuffle=True, shuffle_seed=seed,
                                        batch_size=batch_size)
        self.loader = StreamingDataLoader(self.dataset, batch_size=batch_size, num_workers=workers(),
                                          pin_memory=device.type == "cuda", drop_last=True)

    def batch(self, item):
        return split_blocks(item["tokens"], self.device)


class WindowSource:
    """A Grain data source (len and getitem): record i is the (T+1)-token window at start i within one shard,
    RandomWindows' indexing, as the shard's own tokens (Grain ships numpy arrays between processes)."""

    def __init__(self, shards, seq_len: int):
        self.windows = RandomWindows(shards, seq_len)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> np.ndarray:
        w = self.windows
        if w.arrays is None:  # opened in each worker process, on its first record
            w.arrays = [s.memmap() for s in w.shards]
        k = int(np.searchsorted(w.ends, index, side="right"))
        start = index - (int(w.ends[k - 1]) if k else 0)
        return np.asarray(w.arrays[k][start:start + w.seq_len + 1])

    def __getstate__(self):
        return {"windows": RandomWindows(self.windows.shards, self.windows.seq_len)}  # never the maps


class Grain(PeerProvider):
    """Grain: MapDataset.source(windows).shuffle(seed)[rank::world_size].batch(B), then to_iter_dataset() and
    mp_prefetch(MultiprocessingOptions(num_workers)), its dataset API's recipe; state from get_state()."""

    name = "grain"
    module, distribution = "grain", "grain"

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0, rank: int = 0,
                 world_size: int = 1, **options):
        import grain

        self.device = device
        dataset = (grain.MapDataset.source(WindowSource(shards, seq_len)).shuffle(seed=seed)[rank::world_size]
                   .batch(batch_size, drop_remainder=True))
        self.dataset = dataset.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=workers()))
        self.iterator = iter(self.dataset)

    def __call__(self):
        block = torch.from_numpy(next(self.iterator))
        if self.device.type == "cuda":
            block = block.pin_memory()
        return split_blocks(block, self.device)

    def state_dict(self):
        return self.iterator.get_state()

    def load_state_dict(self, state) -> None:
        self.iterator.set_state(state)

    def close(self) -> None:
        iterator, self.iterator = self.iterator, None
        close = getattr(iterator, "close", None)
        if close is not None:
            close()


def _hf_examples(paths, token_dtype, length):
    """Dataset.from_generator's generator: one example per block of `length` tokens of the stream. from_generator
    shards a list argument: it runs this once per shard file, so blocks are those of each shard."""
    for block in stream_blocks(paths, np.dtype(token_dtype), length):
        yield {"input_ids": block}


class HFDatasets(LoaderPeer):
    """HF datasets: an Arrow table of T+1-token blocks (run_clm's group_texts, per shard) from Dataset.from_generator,
    save_to_disk once; load_from_disk(...).with_format("torch"), split_dataset_by_node on several ranks, then
    torchdata's StatefulDataLoader(shuffle=True), the loader HF's docs name for resuming (torch's
    DataLoader, without a state, when torchdata is not installed)."""

    name = "hf-datasets"
    module, distribution = "datasets", "datasets"
    sampling = "shuffled blocks"

    @classmethod
    def convert(cls, shards, seq_len, cache_dir):
        def run(directory):
            import datasets

            features = datasets.Features(
                {"input_ids": datasets.Sequence(datasets.Value(np.dtype(shards[0].dtype).name), length=seq_len + 1)})
            kwargs = dict(paths=[s.path for s in shards], token_dtype=str(shards[0].dtype), length=seq_len + 1)
            building = directory + ".build"  # from_generator's own cache, deleted once saved
            table = datasets.Dataset.from_generator(_hf_examples, gen_kwargs=kwargs, features=features,
                                                    cache_dir=building)
            table.save_to_disk(directory)
            del table
            shutil.rmtree(building, ignore_errors=True)

        return convert_once(cls.name, shards, seq_len, cache_dir, run)

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0, rank: int = 0,
                 world_size: int = 1, cache_dir: Optional[str] = None, **options):
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.conversion = self.convert(shards, seq_len, cache_dir)
        self.device = device
        table = datasets.load_from_disk(self.conversion.directory).with_format("torch")
        if world_size > 1:
            table = split_dataset_by_node(table, rank=rank, world_size=world_size)
        try:
            from torchdata.stateful_dataloader import StatefulDataLoader as loader_class
        except ImportError:
            loader_class = torch.utils.data.DataLoader
            self.no_state = "torchdata is not installed: torch's DataLoader keeps no state"
        self.loader = loader_class(table, batch_size=batch_size, shuffle=True, drop_last=True,
                                   generator=torch.Generator().manual_seed(seed), num_workers=workers(),
                                   pin_memory=device.type == "cuda")

    def batch(self, item):
        return split_blocks(item["input_ids"], self.device)


PEERS = {cls.name: cls for cls in (TorchData, LitData, MosaicStreaming, Grain, HFDatasets)}
