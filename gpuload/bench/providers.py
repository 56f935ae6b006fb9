"""The loaders `gpuload bench` compares, each a faithful copy of the way its project makes a batch.

A provider is built from the shards (gpuload.shards.Shard: path, token offset, count, dtype), a batch
shape and a device; calling it returns (x, y), both (B, T) int64 on the device, y = x shifted by one
token along the stream. All providers deliver the same kind of batch, so the table compares like with
like; nanochat-seq reads the stream in order (that is its design), the peers that store fixed blocks
read those blocks shuffled (`sampling` says which), the others read random windows.

The libraries people install instead (litdata, mosaicml-streaming, torchdata, Grain, HF datasets) are in
peers.py; `gpuload bench --audit` (audit.py) checks resume, determinism and elastic resume through
state_dict / load_state_dict and the rank and world_size a provider is built for.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import numpy as np
import torch

from gpuload import native
from gpuload.machine import usable_cores

# The libraries people install instead of a hand-written loader (peers.py), in table order.
PEER_NAMES = ("torchdata", "litdata", "mosaic-streaming", "grain", "hf-datasets")
# Listed in table order: the loaders in use today (hand copies, then the peer libraries), then gpuload's
# backends from the fastest expected.
PROVIDER_NAMES = ("nanogpt", "torch-dataloader") + PEER_NAMES + (
    "nanochat-seq", "gpuload-cuda-triton-ring", "gpuload-cuda-triton-zerocopy", "gpuload-cpu-native",
    "gpuload-cpu-torch")
BASELINE = "nanogpt"
DATALOADER_WORKERS = 4  # a typical choice, and few enough that a small machine keeps a core for the main process


class NoState(NotImplementedError):
    """A provider that cannot save or restore its position; the message says why."""


def nanogpt_get_batch(path: str, batch_size: int, block_size: int, device: torch.device = torch.device("cpu"),
                      dtype=np.uint16, offset: int = 0):
    """nanoGPT's train.py get_batch: memmap re-created per batch, random starts, per-row slices, torch.stack.

    `dtype` and `offset` (bytes before the first token) let it read llm.c shards and .npy files too;
    nanoGPT's own train.bin is headerless uint16 (the defaults).
    """
    # nanoGPT re-creates the memmap every batch to avoid a memory leak (its comment cites numpy's memmap usage).
    data = np.memmap(path, dtype=dtype, mode="r", offset=offset)
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy((data[i:i + block_size]).astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy((data[i + 1:i + 1 + block_size]).astype(np.int64)) for i in ix])
    if device.type == "cuda":
        # pin arrays x,y, which allows us to move them to GPU asynchronously (non_blocking=True)
        x, y = x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    else:
        x, y = x.to(device), y.to(device)
    return x, y


class Provider(ABC):
    """A loader under test: call it for (x, y); close() releases what it holds.

    Built with (shards, batch_size, seq_len, device) and the keywords seed, rank, world_size (batch_size
    rows per rank) and cache_dir (where a peer keeps its converted copy of the shards).
    """

    name = ""
    sampling = "random"  # "random" windows, "shuffled blocks" (fixed blocks, shuffled), or "sequential"
    conversion = None  # peers: the run of their own converter (peers.Converted), done once per dataset
    # Why state_dict() cannot save this loader's position, or None when it can.
    no_state: Optional[str] = "a hand copy of a training script's loader: it saves no position"
    # True for loaders whose ranks must run at once, each in its own process (they meet in shared memory).
    ranks_in_processes = False

    @abstractmethod
    def __call__(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch (x, y)."""

    def state_dict(self):
        """The loader's position, as its library saves it (picklable)."""
        raise NoState(self.no_state)

    def load_state_dict(self, state) -> None:
        """Continue from a state_dict() saved by a loader built with the same arguments (world size aside)."""
        raise NoState(self.no_state)

    @classmethod
    def rank_env(cls, rank: int, world_size: int) -> dict:
        """Environment variables the loader of rank `rank` reads its rank from (set while it is built and runs)."""
        return {}

    def close(self) -> None:
        pass


class NanoGPT(Provider):
    """nanoGPT's get_batch. nanoGPT reads one train.bin: the first shard stands in for it."""

    name = "nanogpt"
    no_state = "get_batch draws from torch's global RNG, which train.py seeds once and never saves"

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0, rank: int = 0,
                 **options):
        torch.manual_seed(1337 + seed + rank)  # train.py: torch.manual_seed(1337 + seed_offset), offset = rank
        shard = shards[0]
        self.args = (shard.path, batch_size, seq_len, device, shard.dtype, shard.offset)

    def __call__(self):
        return nanogpt_get_batch(*self.args)


class RandomWindows(torch.utils.data.Dataset):
    """The usual map-style token Dataset: item i is the (T+1)-token window at start i, within one shard."""

    def __init__(self, shards, seq_len: int):
        self.shards = [s for s in shards if s.num_tokens > seq_len]
        self.seq_len = seq_len
        self.ends = np.cumsum([s.num_tokens - seq_len for s in self.shards])  # windows up to and including shard k
        self.arrays = None

    def __len__(self) -> int:
        return int(self.ends[-1])

    def __getitem__(self, index: int):
        if self.arrays is None:  # opened in each worker process, on its first item
            self.arrays = [s.memmap() for s in self.shards]
        k = int(np.searchsorted(self.ends, index, side="right"))
        start = index - (int(self.ends[k - 1]) if k else 0)
        window = torch.from_numpy(self.arrays[k][start:start + self.seq_len + 1].astype(np.int64))
        return window[:-1], window[1:]


class TorchDataLoader(Provider):
    """RandomWindows through torch.utils.data.DataLoader: worker processes, pinned batches on CUDA."""

    name = "torch-dataloader"
    no_state = "torch's DataLoader has no state_dict: a restart begins the sampler again"

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0, **options):
        dataset = RandomWindows(shards, seq_len)
        sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=1 << 40,
                                                 generator=torch.Generator().manual_seed(seed))
        self.workers = min(DATALOADER_WORKERS, usable_cores())
        self.device = device
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                                  num_workers=self.workers, pin_memory=device.type == "cuda")
        self.iterator = iter(self.loader)

    def __call__(self):
        x, y = next(self.iterator)
        if self.device.type == "cuda":
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def close(self) -> None:
        # DataLoader has no public close; left to the garbage collector, idle workers could outlive this
        # provider and share the cores with the next one's timing.
        iterator, self.iterator = self.iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


class NanochatSeq(Provider):
    """nanochat's / llm.c's sequential loader: B*T+1 contiguous tokens per rank, viewed as (B, T) x and y.

    The tokens are read with one file read at the current position (llm.c's fseek + fread), widened to
    int64 in one pinned buffer (nanochat's `scratch`), and x = scratch[:-1], y = scratch[1:] are views of
    it, copied to the device. One rank: the position advances by B*T; at the end of a shard the next one
    starts, wrapping to the first. llm.c refuses a shard shorter than B*T+1 tokens; here it is skipped.
    """

    name = "nanochat-seq"
    sampling = "sequential"
    no_state = "the loader copied here keeps its position (shard, offset) in memory and saves none"

    def __init__(self, shards, batch_size: int, seq_len: int, device: torch.device, **options):
        self.B, self.T, self.device = batch_size, seq_len, device
        self.shards = [s for s in shards if s.num_tokens >= batch_size * seq_len + 1]
        self.buffer = np.empty(batch_size * seq_len + 1, dtype=self.shards[0].dtype)
        self.index, self.position, self.file = 0, 0, None
        self._open(0)

    def _open(self, index: int) -> None:
        if self.file is not None:
            self.file.close()
        self.index, self.position = index, 0
        self.file = open(self.shards[index].path, "rb", buffering=0)

    def __call__(self):
        B, T = self.B, self.T
        shard = self.shards[self.index]
        if self.position + B * T + 1 > shard.num_tokens:
            self._open((self.index + 1) % len(self.shards))
            shard = self.shards[self.index]
        self.file.seek(shard.offset + self.position * self.buffer.itemsize)
        got = self.file.readinto(self.buffer)
        if got != self.buffer.nbytes:
            raise OSError(f"{shard.path}: expected {self.buffer.nbytes} bytes at token {self.position}, read {got}; "
                          f"the shard changed while the benchmark ran: re-create it")
        self.position += B * T
        scratch = torch.empty(B * T + 1, dtype=torch.int64, pin_memory=self.device.type == "cuda")
        scratch.copy_(torch.from_numpy(self.buffer))
        x, y = scratch[:-1].view(B, T), scratch[1:].view(B, T)
        if self.device.type == "cuda":
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class GPULoaderProvider(Provider):
    """gpuload's GPULoader, random windows, on one backend (and, for triton, one placement of the stream)."""

    no_state = None

    def __init__(self, name: str, backend: str, placement: Optional[str], shards, batch_size: int, seq_len: int,
                 device: torch.device, seed: int = 0, rank: int = 0, world_size: int = 1, **options):
        from gpuload.loader import GPULoader

        self.name = name
        where = {"placement": placement} if placement is not None else {}
        self.loader = GPULoader([s.path for s in shards], batch_size=batch_size, seq_len=seq_len, sampling="random",
                                seed=seed, rank=rank, world_size=world_size, device=device, backend=backend,
                                token_dtype=shards[0].dtype, **where)
        self.next = self.loader.__next__

    def __call__(self):
        return self.next()

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state) -> None:
        self.loader.load_state_dict(state)

    def close(self) -> None:
        self.loader.close()


# gpuload provider -> (backend, placement). The cpu-* providers gather on the host whatever the device:
# native reads the memory maps in place, and torch with placement="zero-copy" reads the host ring (with
# "device" on CUDA it would gather from a device ring).
GPULOAD_BACKENDS = {
    "gpuload-cuda-triton-ring": ("triton", "device"),
    "gpuload-cuda-triton-zerocopy": ("triton", "zero-copy"),
    "gpuload-cpu-native": ("native", None),
    "gpuload-cpu-torch": ("torch", "zero-copy"),
}
OTHER_PROVIDERS = {"nanogpt": NanoGPT, "torch-dataloader": TorchDataLoader, "nanochat-seq": NanochatSeq}


def unavailable(name: str, device: torch.device) -> Optional[str]:
    """Why provider `name` cannot run on `device` here, or None when it can."""
    if name in PEER_NAMES:
        from gpuload.bench.peers import PEERS

        return PEERS[name].unavailable()
    backend = GPULOAD_BACKENDS.get(name, (None,))[0]
    if backend == "triton" and device.type != "cuda":
        return "needs a CUDA device"
    if backend == "native" and not native.available():
        return "native extension disabled by GPULOAD_NO_NATIVE=1" if native.disabled() else "native extension not built"
    return None


def provider_class(name: str) -> type:
    """The class of provider `name` (one of PROVIDER_NAMES)."""
    if name in GPULOAD_BACKENDS:
        return GPULoaderProvider
    if name in PEER_NAMES:
        from gpuload.bench.peers import PEERS

        return PEERS[name]
    return OTHER_PROVIDERS[name]


def convert_for(name: str, shards, seq_len: int, cache_dir: Optional[str]):
    """Run provider `name`'s own converter on `shards` now, or reuse its cached copy (peers.Converted); None for
    a provider that reads the shards in place."""
    return provider_class(name).convert(shards, seq_len, cache_dir) if name in PEER_NAMES else None


def make_provider(name: str, shards, batch_size: int, seq_len: int, device: torch.device, seed: int = 0,
                  rank: int = 0, world_size: int = 1, cache_dir: Optional[str] = None) -> Provider:
    """Provider `name` (one of PROVIDER_NAMES) reading `shards` in (batch_size, seq_len) batches on `device`,
    as rank `rank` of `world_size` (batch_size rows each); a peer keeps its converted copy under `cache_dir`."""
    options = dict(seed=seed, rank=rank, world_size=world_size, cache_dir=cache_dir)
    if name in GPULOAD_BACKENDS:
        backend, placement = GPULOAD_BACKENDS[name]
        return GPULoaderProvider(name, backend, placement, shards, batch_size, seq_len, device, **options)
    return provider_class(name)(shards, batch_size, seq_len, device, **options)
