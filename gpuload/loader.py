"""GPULoader: the iterator a training loop holds; batches, DDP ranks, and exact resume.

The loader is thin: its arguments become a plan (gpuload/plan.py), the plan's backend a producer built once
(gpuload/producers.py) whose `produce(step)` is the per-step path, and states are made and checked in
gpuload/state.py. Per next(): the loop bound, the contract's domain, one `produce`, the step.
"""

from __future__ import annotations

import operator
import threading
from typing import Mapping, Optional

import numpy as np
import torch

from gpuload.plan import BACKENDS, Plan, Source, default_device, default_rank_world, ring_budgets
from gpuload.producers import make_producer
from gpuload.sampling import check_domain
from gpuload.state import check_state, make_state

__all__ = ["GPULoader", "BACKENDS", "Source", "default_device", "default_rank_world", "ring_budgets"]


class GPULoader:
    """Infinite iterator of (x, y) token batches of shape (batch_size, seq_len) for one DDP rank.

    Global row g = rank * batch_size + b of step s reads the window chosen by `sampling` from
    (seed, s, g) and the global batch G = world_size * batch_size (see gpuload/sampling.py), so the
    stream of global batches is the same for any world_size with the same G. The torch and triton
    backends read tokens from a ring (gpuload/ring.py) of `ring_tokens` tokens (None: the whole stream
    when it fits this rank's share of the node's budget, gpuload.ring.default_ring_bytes(local ranks)); a
    ring smaller than the stream switches random and shuffle to the chunked rule, on every backend alike.
    next(), state_dict() and load_state_dict() may be called from several threads: each next() is one whole step.

    `files` as {name: files} with `weights={name: weight}` is a mixture: every global batch takes
    exactly c_k rows from source k (gpuload/mixture.py), and each source keeps its own position.

    `doc_info=True` (with `bos_token`) returns (x, y, doc) with fixed shapes and no sync: cu_seqlens padded
    to `doc_capacity` + 1 entries (default: enough for any batch of this stream), max_seqlen = T;
    `doc_info="exact"` trims cu_seqlens and reads the exact ints, one device-to-host sync per step.
    With `static_buffers=True` on the triton backend and a ring holding each whole stream, the step lives
    on the device and next() can be captured in a CUDA graph (README, "CUDA graphs").
    """

    def __init__(self, files, batch_size: int, seq_len: int, sampling: str = "random", seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, device=None,
                 input_dtype: torch.dtype = torch.int64, backend: str = "auto", token_dtype=np.uint16,
                 ring_tokens: Optional[int] = None, placement: str = "device", static_buffers: bool = False,
                 loop: bool = True, bos_token: Optional[int] = None, doc_info=False,
                 align: Optional[str] = None, weights: Optional[Mapping[str, float]] = None,
                 doc_capacity: Optional[int] = None, pack: Optional[str] = None, pack_remainder: bool = False):
        self._closed = False
        # One step at a time: the producers' scratch and the rings' read lock serve one next() (~0.1 us a step).
        self._lock = threading.Lock()
        self.sources: list[Source] = []
        plan = Plan(files, batch_size, seq_len, sampling, seed, rank, world_size, device, input_dtype, backend,
                    token_dtype, ring_tokens, placement, static_buffers, loop, bos_token, doc_info, align, weights,
                    doc_capacity, pack, pack_remainder)
        try:
            self._producer = make_producer(plan)
        except BaseException:
            plan.close()
            raise
        self._plan = plan
        self.sources = plan.sources
        for name in ("batch_size", "seq_len", "sampling", "rank", "world_size", "global_batch", "input_dtype",
                     "device", "placement", "static_buffers", "loop", "bos_token", "doc_info", "align", "weights",
                     "counts", "num_tokens", "backend", "doc_capacity", "pack", "pack_remainder"):
            setattr(self, name, getattr(plan, name))
        self._step = 0
        self._resumed = False  # a state was loaded since the last iter(): loop=False's next pass goes on from it
        self._last_step = (1 << 63) // self.global_batch - 1  # the contract's domain (gpuload.sampling.check_domain)

    @property
    def seed(self) -> int:
        return self._plan.seed

    @property
    def step(self) -> int:
        """The next step to produce. With a device step counter (a CUDA graph may have advanced it) this reads
        the counter back: a device-to-host sync."""
        counter = self._producer.counter
        return self._step if counter is None else int(counter[0])

    @property
    def mixed(self) -> bool:
        return self._plan.mixed

    @property
    def align_bos(self) -> Optional[int]:
        """The token rows are aligned to (align='bos'), else None."""
        return self._plan.align_bos

    def __iter__(self):
        """The loader itself. With loop=False each iter() starts a fresh pass at step 0, as a DataLoader's does (an
        evaluation loader kept across evaluations evaluates every time), except the first iter() after
        load_state_dict(), which goes on with the loaded pass. A looping loader goes on where it is."""
        if not self.loop:
            with self._lock:
                if self._resumed:
                    self._resumed = False
                else:
                    self._set_step(0)
        return self

    def __len__(self) -> int:
        """Batches in one pass with loop=False: whole global batches of the epoch (a final partial one is dropped)."""
        if self.loop:
            raise TypeError("a looping GPULoader is infinite; pass loop=False for one pass with a length")
        return self._plan.epoch_windows(self.sources[0]) // self.global_batch

    def __next__(self):
        """(x, y), or (x, y, doc) with doc_info=True (gpuload.documents.DocInfo, computed on the batch's device).

        Safe from several threads: each call gets a whole, distinct step."""
        with self._lock:
            step = self._step
            if not self.loop and step >= len(self):
                raise StopIteration
            if self._closed:
                raise RuntimeError("the loader is closed; create a new GPULoader (and load_state_dict) to go on")
            if step > self._last_step:
                check_domain(step, self.global_batch, self.num_tokens)
            x, y = self._producer.produce(step)
            self._step = step + 1
            if self.doc_info:
                return x, y, self._producer.doc_info(x)
            return x, y

    def _check_step(self, step) -> int:
        """`step` as an int of the contract's domain; bools and floats are refused rather than taken as steps."""
        if isinstance(step, bool):
            raise ValueError(f"step must be an integer >= 0, got {step!r} (a bool)")
        try:
            step = operator.index(step)
        except TypeError:
            raise ValueError(f"step must be an integer >= 0, got {step!r} ({type(step).__name__})") from None
        check_domain(step, self.global_batch, self.num_tokens)
        return step

    def row_sources(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, index) of each of this rank's rows at `step` (int64, CPU): the row's source in
        `self.sources` and its row among that source's c_k rows (the global row of its contract)."""
        return self._plan.row_sources(self._check_step(step))

    def window_starts(self, step: int) -> torch.Tensor:
        """Window start of each of this rank's rows at `step` (int64, CPU), in the stream of the row's source."""
        return self._plan.window_starts(self._check_step(step))

    def state_dict(self) -> dict:
        """Everything needed to continue the same batch stream; plain data (JSON-serializable)."""
        with self._lock:  # the step of the last whole next(), never one in flight
            return make_state(self._plan, self.step, self.seed)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses a state of other datasets, seq_len, global batch or sampling mode.

        A mixture state with other weights (other rows per source) is taken, with a warning: each source
        goes on from `step` by the contract with its new rows per step (README, "Mixtures").
        """
        step, seed = check_state(self._plan, state)
        with self._lock:
            if seed != self._plan.seed:
                self._plan.set_seed(seed)
                self._producer.set_seed(seed)
            self._set_step(step)
            self._resumed = True

    def _set_step(self, step: int) -> None:
        self._step = step
        set_step = getattr(self._producer, "set_step", None)
        if set_step is not None:
            set_step(step)

    def pinned_bytes(self) -> int:
        """Host bytes this loader's rings keep page-locked now: with CUDA, 2 x 16 MiB of staging per filling
        device ring, or a zero-copy ring's own pages; 0 on the CPU (README, "What a loader pins")."""
        return sum(source.ring.pinned_bytes() for source in self.sources if source.ring is not None)

    def close(self) -> None:
        """Stop the rings' fillers, free the rings and release the shards (a batch in flight completes).

        Does not take the lock next() holds: a next() in another thread may be waiting for a ring fill, which
        stopping the filler ends (that next() raises 'closed'); the nexts queued behind it find the loader closed."""
        was_closed, self._closed = self._closed, True
        producer = getattr(self, "_producer", None)
        if producer is not None:
            if producer.counter is not None and not was_closed:
                self._step = int(producer.counter[0])  # where replays left the step: state_dict() still says it
            producer.close()
        for source in self.sources:
            source.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        def ring(source: Source) -> str:
            chunks = "" if source.chunking is None else f" in chunks of {source.windows_per_chunk} windows"
            return f"ring={source.layout.ring_tokens} tokens{chunks}"

        if self.mixed:
            data = "sources=[" + ", ".join(f"{s.name!r}: {s.rows} rows, {s.num_tokens} tokens, {ring(s)}"
                                           for s in self.sources) + "]"
        else:
            data = f"tokens={self.num_tokens}, {ring(self.sources[0])}"
        pinned = f", pinned={self.pinned_bytes() / 2**20:.1f} MiB" if self.device.type == "cuda" else ""
        return (f"GPULoader(B={self.batch_size}, T={self.seq_len}, sampling={self.sampling!r}, seed={self.seed}, "
                f"rank={self.rank}/{self.world_size}, backend={self.backend!r}, device={self.device}, {data}, "
                f"{self._node_memory()}{pinned})")

    def _node_memory(self) -> str:
        """What the node holds for this loader when each of its ranks makes one alike: its ranks x this one's rings,
        in device memory (placement='device' on CUDA) or host memory; the native backend holds no ring."""
        ranks = f"node={self._plan.local_ranks} rank{'s' if self._plan.local_ranks > 1 else ''}"
        if self.backend == "native":
            return f"{ranks} x 0.0 MiB (native reads the memory maps in place)"
        held = sum(source.layout.ring_tokens for source in self.sources) * self.sources[0].stream.dtype.itemsize
        kind = "device" if self.device.type == "cuda" and self.placement == "device" else "host"
        size = f"{held / 2**20:.1f} MiB" if held >= 2**20 else f"{held / 2**10:.1f} KiB"
        return f"{ranks} x {size} {kind}"
