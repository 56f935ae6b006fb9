"""GPULoader: the iterator a training loop holds; batches, DDP ranks, and exact resume."""

from __future__ import annotations

import operator
import os
import warnings
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from gpuload import native
from gpuload.cuda import capture_error, resolve_device
from gpuload.documents import (AlignedChunking, aligned_window_starts_and_visits, doc_info_reference, document_starts,
                               usable_document_starts)
from gpuload.kernels.gather import gather_reference
from gpuload.mixture import mixture_counts, mixture_rows
from gpuload.ring import NUM_SLOTS, PLACEMENTS, Ring, RingLayout, default_ring_bytes, plan_ring, smallest_chunked_ring
from gpuload.sampling import MASK64, SAMPLING_IDS, SAMPLING_MODES, check_domain, window_starts_and_visits
from gpuload.shards import TokenStream

BACKENDS = ("auto", "torch", "native", "triton")
STATE_FORMAT = "gpuload.loader/2"
STATE_KEYS = ("format", "step", "seed", "sampling", "seq_len", "global_batch", "align_bos", "sources")
SOURCE_STATE_KEYS = ("name", "dataset", "num_tokens", "windows_per_chunk", "rows")
STATE_FORMAT_1 = "gpuload.loader/1"  # before mixtures: one dataset, its fields at the top level


def _state_from_format_1(state: dict) -> dict:
    """A format-1 state as the one-source state of format 2 (a malformed one stays malformed, for the checks)."""
    old_keys = ("num_tokens", "dataset", "windows_per_chunk")
    source = {"name": None, **{key: state[key] for key in old_keys if key in state},
              "rows": state.get("global_batch")}
    rest = {key: value for key, value in state.items() if key not in old_keys}
    return {**rest, "format": STATE_FORMAT, "sources": [source]}


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _as_int(name: str, value) -> int:
    """An integer argument (int, numpy integer, ...); bool and float are refused rather than truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialized, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        return rank, world
    return 0, 1


def default_device() -> torch.device:
    """cuda:{LOCAL_RANK} when CUDA is available and LOCAL_RANK names one of its devices (else the current
    CUDA device: a launcher that gives each process one GPU by CUDA_VISIBLE_DEVICES), else cpu."""
    if torch.cuda.is_available():
        local_rank = _env_int("LOCAL_RANK")
        if local_rank is None or 0 < torch.cuda.device_count() <= local_rank:
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def ring_budgets(sizes: Sequence[int], budget: int) -> list[int]:
    """Ring tokens for each source of `sizes` tokens out of `budget` in all, by water-filling: a source
    smaller than its even share is held whole and leaves the rest to the larger ones."""
    out = [0] * len(sizes)
    left = budget
    for i, k in enumerate(sorted(range(len(sizes)), key=lambda k: sizes[k])):
        out[k] = min(sizes[k], left // (len(sizes) - i))
        left -= out[k]
    return out


class Source:
    """One dataset of a loader: its token stream, its rows of every global batch, and where its tokens are read.

    A plain loader has one source (name None) with all G rows; a mixture has one per dataset, source k
    with c_k rows (gpuload/mixture.py), sampled by the contract with c_k as its global batch.
    """

    def __init__(self, name: Optional[str], stream: TokenStream, rows: int):
        self.name, self.stream, self.rows = name, stream, rows
        self.num_tokens = stream.num_tokens
        self.fingerprint = stream.fingerprint()
        self.layout: Optional[RingLayout] = None
        self.doc_starts: Optional[torch.Tensor] = None  # align='bos': document starts where a window fits
        self.aligned: Optional[AlignedChunking] = None  # align='bos' on a chunked ring: the starts by chunk
        self.ring: Optional[Ring] = None                # torch and triton backends
        self.table = None                               # native backend: the shard table read in place

    @property
    def chunking(self):
        return self.layout.chunking

    @property
    def windows_per_chunk(self) -> int:
        """Windows per ring chunk of the chunked rule; 0 when the ring holds the whole stream."""
        return 0 if self.chunking is None else self.chunking.windows_per_chunk

    def where(self) -> str:
        """How error messages name this source: its name and first shard."""
        paths = self.stream.paths
        files = f"{paths[0]}{' ...' if len(paths) > 1 else ''}"
        return files if self.name is None else f"source {self.name!r} ({files})"

    def state(self) -> dict:
        return {"name": self.name, "dataset": self.fingerprint, "num_tokens": self.num_tokens,
                "windows_per_chunk": self.windows_per_chunk, "rows": self.rows}

    def close(self) -> None:
        # Detached before closing, so a next() starting meanwhile finds no ring rather than a closing one.
        ring, self.ring, self.table = self.ring, None, None
        if ring is not None:
            ring.close()
        self.stream.close()


class GPULoader:
    """Infinite iterator of (x, y) token batches of shape (batch_size, seq_len) for one DDP rank.

    Global row g = rank * batch_size + b of step s reads the window chosen by `sampling` from
    (seed, s, g) and the global batch G = world_size * batch_size (see gpuload/sampling.py), so the
    stream of global batches is the same for any world_size with the same G. The torch and triton
    backends read tokens from a ring (gpuload/ring.py) of `ring_tokens` tokens (None: the whole stream
    when it fits gpuload.ring.default_ring_bytes()); a ring smaller than the stream switches random and
    shuffle to the chunked rule, on every backend alike.

    `files` as {name: files} with `weights={name: weight}` is a mixture: every global batch takes
    exactly c_k rows from source k (gpuload/mixture.py), and each source keeps its own position.
    """

    def __init__(self, files, batch_size: int, seq_len: int, sampling: str = "random", seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, device=None,
                 input_dtype: torch.dtype = torch.int64, backend: str = "auto", token_dtype=np.uint16,
                 ring_tokens: Optional[int] = None, placement: str = "device", static_buffers: bool = False,
                 loop: bool = True, bos_token: Optional[int] = None, doc_info: bool = False,
                 align: Optional[str] = None, weights: Optional[Mapping[str, float]] = None):
        batch_size, seq_len, seed = _as_int("batch_size", batch_size), _as_int("seq_len", seq_len), _as_int("seed", seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if input_dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_dtype must be torch.int64 or torch.int32, got {input_dtype}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not loop and sampling != "sequential":
            raise ValueError(f"loop=False (one pass, for evaluation) needs sampling='sequential', got {sampling!r}")
        if bos_token is not None:
            bos_token = _as_int("bos_token", bos_token)
        if (doc_info or align) and bos_token is None:
            raise ValueError("doc_info=True and align='bos' need bos_token=ID: documents are delimited by that token")
        if align not in (None, "bos"):
            raise ValueError(f"align must be None or 'bos', got {align!r}")
        if align and sampling == "sequential":
            raise ValueError("align='bos' works with sampling='random' or 'shuffle'; sequential reads the stream in order")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if ring_tokens is not None:
            ring_tokens = _as_int("ring_tokens", ring_tokens)
            if ring_tokens < 1:
                raise ValueError(f"ring_tokens must be >= 1 (or None for the whole stream), got {ring_tokens}")
        default_rank, default_world = default_rank_world()
        rank = default_rank if rank is None else _as_int("rank", rank)
        world_size = default_world if world_size is None else _as_int("world_size", world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

        self.batch_size, self.seq_len, self.sampling, self.seed = batch_size, seq_len, sampling, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = world_size * batch_size
        self.input_dtype = input_dtype
        # Always with an index on CUDA: every device check compares against the tensors' own cuda:N.
        self.device = resolve_device(default_device() if device is None else device)
        self.placement, self.static_buffers, self.loop = placement, bool(static_buffers), bool(loop)
        self.bos_token, self.doc_info, self.align = bos_token, bool(doc_info), align
        self.step = 0
        self.sources: list[Source] = []
        self._closed = False

        named_files, self.weights, self.counts = self._plan_mixture(files, weights)
        try:
            for (name, source_files), rows in zip(named_files, self.counts):
                self.sources.append(Source(name, TokenStream(source_files, token_dtype=token_dtype), rows))
            self._check_sources()
            self.num_tokens = sum(source.num_tokens for source in self.sources)
            self._plan_rings(ring_tokens)
            self.backend = self._choose_backend(backend)
            if self.backend == "triton":
                self._check_triton_device()
            if align:
                for source in self.sources:
                    self._index_documents(source)
            # The native backend reads the memory maps in place through its shard table (which keeps them
            # alive while a call is in flight); the page cache is its ring. The others read the ring.
            for source in self.sources:
                if self.backend == "native":
                    source.table = native.module().ShardTable(source.stream.arrays, source.stream.paths)
                else:
                    source.ring = Ring(source.stream, source.layout, sampling, seed, self.device, placement,
                                       aligned=source.aligned)
        except BaseException:
            self.close()
            raise
        self._rows = torch.arange(rank * batch_size, (rank + 1) * batch_size, dtype=torch.int64)
        self._starts = np.empty(batch_size, dtype=np.int64)
        self._which, self._index = np.empty(batch_size, dtype=np.int64), np.empty(batch_size, dtype=np.int64)
        self._out = None
        if self.static_buffers:
            self._out = (torch.empty((batch_size, seq_len), dtype=input_dtype, device=self.device),
                         torch.empty((batch_size, seq_len), dtype=torch.int64, device=self.device))

    def _plan_mixture(self, files, weights):
        """([(name, files)], weights or None, rows per source) from the constructor's files and weights."""
        if not isinstance(files, Mapping):
            if weights is not None:
                raise ValueError("weights= is for a mixture: pass files as {name: files}, e.g. "
                                 "GPULoader({'web': 'web/*.bin', 'code': 'code/*.bin'}, weights={'web': 0.7, 'code': 0.3})")
            return [(None, files)], None, [self.global_batch]
        names = list(files)
        bad = [name for name in names if not isinstance(name, str) or not name]
        if bad:
            raise ValueError(f"mixture source names must be non-empty strings, found {bad!r}")
        if weights is None:
            raise ValueError(f"a mixture of {names} needs weights={{name: weight}} for each source")
        if not isinstance(weights, Mapping):
            raise ValueError(f"weights must be a dict {{name: weight}} over the sources {names}, found "
                             f"{type(weights).__name__}")
        if set(weights) != set(names):
            missing, extra = [n for n in names if n not in weights], [n for n in weights if n not in files]
            raise ValueError(f"weights must name exactly the sources {names}: "
                             + "; ".join(part for part in (f"missing {missing}" if missing else "",
                                                           f"unknown {extra}" if extra else "") if part))
        if not self.loop:
            raise ValueError("loop=False (one evaluation pass) reads one dataset; evaluate each source of a mixture "
                             "with its own GPULoader")
        ordered = {name: weights[name] for name in names}
        counts = mixture_counts(ordered, self.global_batch)
        empty = [name for name, c in zip(names, counts) if c == 0]
        if empty:
            raise ValueError(f"mixture source(s) {empty} get 0 of the {self.global_batch} rows of each global batch "
                             f"(weights {ordered}): raise their weights or the global batch, or drop them")
        return [(name, files[name]) for name in names], ordered, counts

    def _check_sources(self) -> None:
        """Every source holds a window; a mixture's sources share the token width and vocabulary."""
        for source in self.sources:
            if source.num_tokens < self.seq_len + 1:
                raise ValueError(f"{source.where()} holds {source.num_tokens} tokens in all; a window needs "
                                 f"seq_len + 1 = {self.seq_len + 1}. Use a smaller seq_len or more data.")
        if len(self.sources) == 1:
            return
        widths = {source.stream.dtype for source in self.sources}
        if len(widths) > 1:
            found = ", ".join(f"{s.where()}: {s.stream.dtype}" for s in self.sources)
            raise ValueError(f"mixture sources have different token widths ({found}); a batch mixes their tokens, so "
                             f"all must come from one tokenizer: re-create the shards with one encoding")
        vocabularies = [(s, s.stream.vocabulary()) for s in self.sources]
        known = [(s, v) for s, v in vocabularies if v is not None]
        if len({v[:2] for _, v in known}) > 1:
            found = ", ".join(f"{s.name!r}: {v[0]} ({v[1]} tokens, per {v[2]})" for s, v in known)
            raise ValueError(f"mixture sources were tokenized with different vocabularies ({found}); the same id would "
                             f"mean different text: re-tokenize every source with one encoding (gpuload prepare "
                             f"--encoding)")

    def _plan_rings(self, ring_tokens: Optional[int]) -> None:
        itemsize = self.sources[0].stream.dtype.itemsize
        budget = default_ring_bytes() // itemsize if ring_tokens is None else ring_tokens
        sizes = [source.num_tokens for source in self.sources]
        shares = ring_budgets(sizes, budget)
        if self.mixed:
            # A source fits when its share holds it whole or holds a chunked ring; shares grow with the budget.
            needs = [min(size, smallest_chunked_ring(itemsize, self.seq_len, source.rows))
                     for size, source in zip(sizes, self.sources)]
            if any(share < need for share, need in zip(shares, needs)):
                low, high = budget, sum(sizes)
                while low < high:
                    middle = (low + high) // 2
                    if all(s >= n for s, n in zip(ring_budgets(sizes, middle), needs)):
                        high = middle
                    else:
                        low = middle + 1
                short = ", ".join(f"{source.name!r} gets {share} and needs {need}" for source, share, need
                                  in zip(self.sources, shares, needs) if share < need)
                given = f"ring_tokens={ring_tokens}" if ring_tokens is not None else \
                    f"the default ring budget ({budget} tokens, gpuload.ring.default_ring_bytes())"
                rows = ", ".join(f"{source.name!r} {source.rows}" for source in self.sources)
                raise ValueError(
                    f"{given} is too small for this mixture: it is shared among the sources (one smaller than its "
                    f"even share is held whole, the others split the rest), and {short}; a source needs its whole "
                    f"stream or, if fewer, 4 page-aligned slots that each hold one global batch of its rows "
                    f"({rows} rows per step) at seq_len {self.seq_len}. "
                    f"Pass ring_tokens >= {low}.")
        for source, share in zip(self.sources, shares):
            source.layout = plan_ring(source.num_tokens, itemsize, self.seq_len, source.rows, share)
            check_domain(0, source.rows, source.num_tokens)

    def _choose_backend(self, backend: str) -> str:
        if backend == "auto":
            if self.device.type == "cuda":
                return "triton"
            return "native" if native.module() is not None else "torch"
        if backend == "native" and not native.available():
            why = "disabled by GPULOAD_NO_NATIVE=1" if native.disabled() else "not built"
            raise RuntimeError(f"backend='native' requested but the native extension is {why}; "
                               f"use backend='torch' or reinstall gpuload with a C++ compiler present")
        return backend

    def _index_documents(self, source: Source) -> None:
        """align='bos': find the usable document starts once, on the device the gather reads them from (the
        triton kernel's; the CPU for the host backends), and group them by chunk on a chunked ring."""
        device = self.device if self.backend == "triton" else torch.device("cpu")
        try:
            source.doc_starts = usable_document_starts(
                document_starts(source.stream.arrays, self.bos_token, device=device), source.num_tokens, self.seq_len)
            if source.chunking is not None:
                source.aligned = AlignedChunking(source.chunking, source.doc_starts, NUM_SLOTS)
        except ValueError as e:
            raise ValueError(f"align='bos' in {source.where()}: {e}") from None

    def _check_triton_device(self) -> None:
        from gpuload.kernels import triton_gather  # imported late: triton is slow to import

        if self.device.type == "cpu" and not triton_gather.interpreter_active():
            raise RuntimeError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported "
                               "(Triton's interpreter); use a CUDA device, or backend='native' on the CPU")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA devices (or the CPU interpreter), not {self.device}")

    def __iter__(self):
        return self

    def __len__(self) -> int:
        """Batches in one pass with loop=False: whole global batches of the epoch (a final partial one is dropped)."""
        if self.loop:
            raise TypeError("a looping GPULoader is infinite; pass loop=False for one pass with a length")
        return (self.num_tokens - 1) // self.seq_len // self.global_batch

    def __next__(self):
        """(x, y), or (x, y, doc) with doc_info=True (gpuload.documents.DocInfo, computed on the batch's device)."""
        if not self.loop and self.step >= len(self):
            raise StopIteration
        x, y = self._produce(self.step)
        self.step += 1
        if self.doc_info:
            return x, y, self._doc_info(x)
        return x, y

    def _doc_info(self, x: torch.Tensor):
        if self.backend == "triton":
            from gpuload.kernels.triton_docs import doc_info_triton

            return doc_info_triton(x, self.bos_token)
        return doc_info_reference(x, self.bos_token)

    @property
    def mixed(self) -> bool:
        return len(self.sources) > 1

    def row_sources(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, index) of each of this rank's rows at `step` (int64, CPU): the row's source in
        `self.sources` and its row among that source's c_k rows (the global row of its contract)."""
        if not self.mixed:
            return torch.zeros_like(self._rows), self._rows.clone()
        return mixture_rows(self.seed, step, self.counts, self._rows)

    def _source_starts(self, source: Source, step: int, index: torch.Tensor):
        """(window starts, ring visits or None) of rows `index` of `source` at `step`."""
        if source.doc_starts is not None:
            return aligned_window_starts_and_visits(self.sampling, self.seed, step, index.to(source.doc_starts.device),
                                                    source.rows, source.doc_starts, source.num_tokens, source.aligned)
        return window_starts_and_visits(self.sampling, self.seed, step, index, source.rows, source.num_tokens,
                                        self.seq_len, source.chunking)

    def window_starts(self, step: int) -> torch.Tensor:
        """Window start of each of this rank's rows at `step` (int64, CPU), in the stream of the row's source."""
        which, index = self.row_sources(step)
        starts = torch.empty_like(index)
        for k, source in enumerate(self.sources):
            mine = which == k
            if bool(mine.any()):
                starts[mine] = self._source_starts(source, step, index[mine])[0].cpu()
        return starts

    def _produce(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        # What each source is read through, taken once: close() may clear them from another thread meanwhile
        # (a ring closed under a running next() raises there; a shard table stays valid while in use).
        readers = [source.table if self.backend == "native" else source.ring for source in self.sources]
        if self._closed or any(reader is None for reader in readers):
            raise RuntimeError("the loader is closed; create a new GPULoader (and load_state_dict) to go on")
        check_domain(step, self.global_batch, self.num_tokens)
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                if torch.cuda.is_current_stream_capturing():
                    raise capture_error("next()")
        if self.backend == "native":
            return self._produce_native(step, readers)
        if self.backend == "triton":
            return self._produce_triton(step, readers)
        return self._produce_torch(step, readers)

    def _outputs(self, device: torch.device, pin: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.batch_size, self.seq_len)
        return (torch.empty(shape, dtype=self.input_dtype, device=device, pin_memory=pin),
                torch.empty(shape, dtype=torch.int64, device=device, pin_memory=pin))

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch on the loader's device, in the static buffers when there are any."""
        if self._out is not None:
            return self._out[0].copy_(x, non_blocking=True), self._out[1].copy_(y, non_blocking=True)
        if x.device != self.device:
            return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        return x, y

    def _produce_native(self, step: int, tables: list) -> tuple[torch.Tensor, torch.Tensor]:
        T, int32 = self.seq_len, self.input_dtype == torch.int32
        # Pinned host memory lets the device copy run asynchronously.
        x, y = self._outputs(torch.device("cpu"), pin=self.device.type == "cuda")
        if not self.mixed:
            source, table = self.sources[0], tables[0]
            if source.doc_starts is None:
                table.sample_and_gather(SAMPLING_IDS[self.sampling], self.seed & MASK64, step,
                                        self.rank * self.batch_size, self.global_batch, T, self._starts,
                                        x.data_ptr(), int32, y.data_ptr(), source.windows_per_chunk)
            else:
                self._native_aligned_starts(source, step, self._rows.numpy(), self._starts)
                table.gather(self._starts, T, x.data_ptr(), int32, y.data_ptr())
            return self._to_device(x, y)
        # The mixture in C++ too: gpuload.mixture.mixture_rows's rule, then per source the starts of its rows and
        # their gather straight into the batch rows they belong to.
        native.module().mixture_rows(self.seed & MASK64, step, self.counts, self.rank * self.batch_size,
                                     self._which, self._index)
        for k, (source, table) in enumerate(zip(self.sources, tables)):
            rows = np.flatnonzero(self._which == k)
            if rows.size == 0:
                continue
            index, starts = self._index[rows], self._starts[:rows.size]
            if source.doc_starts is None:
                table.sample_rows_and_gather(SAMPLING_IDS[self.sampling], self.seed & MASK64, step, index, source.rows,
                                             T, rows, starts, x.data_ptr(), int32, y.data_ptr(), self.batch_size,
                                             source.windows_per_chunk)
            else:
                self._native_aligned_starts(source, step, index, starts)
                table.gather_rows(starts, T, rows, x.data_ptr(), int32, y.data_ptr(), self.batch_size)
        return self._to_device(x, y)

    def _native_aligned_starts(self, source: Source, step: int, rows: np.ndarray, out: np.ndarray) -> None:
        """align='bos' window starts of `source`'s rows `rows` at `step` into `out`, in C++ (csrc/sampling.h)."""
        table, pass0, pos0, visited = None, 0, 0, 0
        if source.aligned is not None:  # a chunked ring: the pass table the Triton kernel reads too
            pass0, pos0, table = source.aligned.step_table(self.seed, step)
            table, visited = table.numpy(), source.aligned.num_visited
        native.module().aligned_starts(SAMPLING_IDS[self.sampling], self.seed & MASK64, step, rows, source.rows,
                                       source.doc_starts.numpy(), table, pass0, pos0, visited, out)

    def _produce_triton(self, step: int, rings: list[Ring]) -> tuple[torch.Tensor, torch.Tensor]:
        from gpuload.kernels.triton_gather import gather_batch_triton

        x, y = self._out if self._out is not None else self._outputs(self.device)
        for k, (source, ring) in enumerate(zip(self.sources, rings)):
            tokens = ring.acquire(step)
            try:
                layout = source.layout
                # One launch per source; with a mixture each writes only the rows the step gives its source.
                gather_batch_triton(tokens, self.sampling, self.seed, step, self.rank * self.batch_size,
                                    self.batch_size, source.rows, source.num_tokens, self.seq_len, x, y,
                                    self.input_dtype, chunking=layout.chunking, num_slots=layout.num_slots,
                                    slot_tokens=layout.slot_tokens, device=self.device,
                                    mixture=(self.counts, k) if self.mixed else None,
                                    doc_starts=source.doc_starts, aligned_chunks=source.aligned)
            finally:
                ring.release(step)
        return x, y

    def _produce_torch(self, step: int, rings: list[Ring]) -> tuple[torch.Tensor, torch.Tensor]:
        which, index = self.row_sources(step)
        parts = []
        for k, (source, ring) in enumerate(zip(self.sources, rings)):
            tokens = ring.acquire(step)
            try:
                rows = torch.nonzero(which == k).flatten() if self.mixed else None
                if rows is None or rows.numel():
                    starts, visits = self._source_starts(source, step, index if rows is None else index[rows])
                    positions = ring.ring_positions(starts, visits).to(tokens.device)
                    bounds = torch.tensor([0, tokens.numel()], device=tokens.device)
                    parts.append((rows, *gather_reference([tokens], bounds, positions, self.seq_len,
                                                          self.input_dtype)))
            finally:
                ring.release(step)
        if not self.mixed:
            return self._to_device(*parts[0][1:])
        # Zero-copy placement: the torch reference reads the host ring, and the rows meet on the host.
        x, y = self._outputs(parts[0][1].device)
        for rows, part_x, part_y in parts:
            x[rows.to(x.device)], y[rows.to(x.device)] = part_x, part_y
        return self._to_device(x, y)

    @property
    def align_bos(self) -> Optional[int]:
        """The token rows are aligned to (align='bos'), else None."""
        return self.bos_token if self.align else None

    def state_dict(self) -> dict:
        """Everything needed to continue the same batch stream; plain data (JSON-serializable)."""
        return {
            "format": STATE_FORMAT, "step": self.step, "seed": self.seed, "sampling": self.sampling,
            "seq_len": self.seq_len, "global_batch": self.global_batch, "align_bos": self.align_bos,
            "sources": [source.state() for source in self.sources],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses a state of other datasets, seq_len, global batch or sampling mode.

        A mixture state with other weights (other rows per source) is taken, with a warning: each source
        goes on from `step` by the contract with its new rows per step (README, "Mixtures").
        """
        if isinstance(state, dict) and state.get("format") == STATE_FORMAT_1:
            state = _state_from_format_1(state)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a gpuload loader state (expected format {STATE_FORMAT!r}): {state!r:.200}")
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"gpuload loader state is missing {', '.join(missing)}; was it saved by state_dict()?")
        for key in ("step", "seed", "seq_len", "global_batch"):
            if type(state[key]) is not int:
                raise ValueError(f"gpuload loader state: {key} must be an integer, found {state[key]!r}")
        saved_sources = state["sources"]
        if (not isinstance(saved_sources, list) or not saved_sources
                or any(not isinstance(s, dict) or set(s) != set(SOURCE_STATE_KEYS) for s in saved_sources)):
            raise ValueError(f"gpuload loader state: sources must be a list of {{{', '.join(SOURCE_STATE_KEYS)}}}, "
                             f"found {saved_sources!r:.200}")
        for i, saved in enumerate(saved_sources):
            for key in ("num_tokens", "windows_per_chunk", "rows"):
                if type(saved[key]) is not int:
                    raise ValueError(f"gpuload loader state: sources[{i}][{key!r}] must be an integer, found "
                                     f"{saved[key]!r}")
            if saved["rows"] < 1:
                raise ValueError(f"gpuload loader state: sources[{i}]['rows'] must be >= 1, found {saved['rows']}")
        if sum(saved["rows"] for saved in saved_sources) != state["global_batch"]:
            raise ValueError(f"gpuload loader state: the sources' rows {[s['rows'] for s in saved_sources]} do not "
                             f"sum to the global batch {state['global_batch']}; was it saved by state_dict()?")
        checks = [
            ("seq_len", state["seq_len"], self.seq_len, "construct the loader with the saved seq_len"),
            ("global_batch", state["global_batch"], self.global_batch,
             "world_size * batch_size must equal the saved global batch (elastic resume keeps it)"),
            ("sampling", state["sampling"], self.sampling, "construct the loader with the saved sampling mode"),
            ("align_bos (the bos_token rows are aligned to, None = not aligned)", state["align_bos"],
             self.align_bos, "construct the loader with the saved align and bos_token"),
            ("sources", [s["name"] for s in saved_sources], [s.name for s in self.sources],
             "construct the loader with the saved sources: the same names in the same order (None = not a mixture)"),
        ]
        for name, saved, current, advice in checks:
            if saved != current:
                raise ValueError(f"cannot load loader state: {name} differs (saved {saved!r}, this loader "
                                 f"{current!r}): {advice}")
        reweighted = []
        for saved, source in zip(saved_sources, self.sources):
            label = "" if source.name is None else f" of source {source.name!r}"
            if saved["dataset"] != source.fingerprint:
                raise ValueError(f"cannot load loader state: the dataset{label} differs: the state was saved on "
                                 f"{saved['num_tokens']} tokens, {source.where()} holds {source.num_tokens}, or "
                                 f"other shards; pass the same shards in the same order")
            # Sequential batches do not depend on the ring's chunks.
            if self.sampling != "sequential" and saved["windows_per_chunk"] != source.windows_per_chunk:
                raise ValueError(f"cannot load loader state: the ring chunking{label} differs (windows_per_chunk "
                                 f"saved {saved['windows_per_chunk']}, this loader {source.windows_per_chunk}; 0 = "
                                 f"whole stream): construct the loader with the saved ring_tokens: with a ring smaller "
                                 f"than the stream, random and shuffle batches depend on its chunks")
            if saved["rows"] != source.rows:
                reweighted.append(f"{source.name!r} {saved['rows']} -> {source.rows}")
        check_domain(state["step"], self.global_batch, self.num_tokens)
        if reweighted:
            warnings.warn(f"gpuload: resuming a mixture with other weights (rows per global batch: "
                          f"{', '.join(reweighted)}); from step {state['step']} on, each source reads by the contract "
                          f"with its new rows, so sequential and shuffle sources jump to another position of their "
                          f"epoch, and random sources on a chunked ring to another chunk (README, 'Mixtures')", stacklevel=2)
        if state["seed"] != self.seed:
            for source in self.sources:
                if source.ring is not None:
                    source.ring.reset(state["seed"])
        self.seed = state["seed"]
        self.step = state["step"]

    def pinned_bytes(self) -> int:
        """Host bytes this loader's rings keep page-locked now: with CUDA, 2 x 16 MiB of staging per filling
        device ring, or a zero-copy ring's own pages; 0 on the CPU (README, "What a loader pins")."""
        return sum(source.ring.pinned_bytes() for source in self.sources if source.ring is not None)

    def close(self) -> None:
        """Stop the rings' fillers, free the rings and release the shards (a batch in flight completes)."""
        self._closed = True
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
                f"rank={self.rank}/{self.world_size}, backend={self.backend!r}, device={self.device}, {data}{pinned})")
