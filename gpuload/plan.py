"""The plan of a loader, decided once from its arguments: the sources (token streams, rows per global batch,
ring layouts, document indexes), the backend and the device; and the contract's rule from (step, row) to a
source and a window start, which every producer and `GPULoader.window_starts` share."""

from __future__ import annotations

import operator
import os
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from gpuload import native
from gpuload.cuda import resolve_device
from gpuload.documents import (AlignedChunking, aligned_window_starts_and_visits, document_starts, max_segments_per_row,
                               sequential_row_starts, usable_document_starts)
from gpuload.mixture import mixture_counts, mixture_rows
from gpuload.packing import BestFitPacking, make_packing
from gpuload.ring import NUM_SLOTS, PLACEMENTS, Ring, RingLayout, default_ring_bytes, plan_ring, smallest_chunked_ring
from gpuload.sampling import MAX_TOKENS, SAMPLING_MODES, check_domain, llmc_row_starts, window_starts_and_visits
from gpuload.shards import TokenStream

BACKENDS = ("auto", "torch", "native", "triton")
LOADER_SAMPLINGS = SAMPLING_MODES + ("llmc",)  # "llmc": llm.c's order (gpuload/sampling.py)
MAX_BATCH_TOKENS = 1 << 31  # batch_size * seq_len stays below: doc_info's cu_seqlens are int32


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer: set it to one, or unset "
                         f"it") from None


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
    if rank is not None or world is not None:
        found = f"RANK={rank}, WORLD_SIZE unset" if world is None else f"WORLD_SIZE={world}, RANK unset"
        raise ValueError(f"the environment sets one of RANK and WORLD_SIZE but not the other ({found}); a launcher "
                         f"such as torchrun sets both: set both, unset both (a single process is rank 0 of 1), or "
                         f"pass rank= and world_size=")
    return 0, 1


def local_world_size() -> int:
    """Ranks on this node, which share its default ring budget (gpuload.ring.default_ring_bytes):
    LOCAL_WORLD_SIZE (torchrun sets it), else the local CUDA devices when there are several (a rank per GPU),
    else 1."""
    local = _env_int("LOCAL_WORLD_SIZE")
    if local is not None:
        if local < 1:
            raise ValueError(f"environment variable LOCAL_WORLD_SIZE={local} must be >= 1 (the ranks on this node, "
                             f"as torchrun sets it): set it to that count, or unset it")
        return local
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return torch.cuda.device_count()
    return 1


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
        self.all_doc_starts: Optional[torch.Tensor] = None  # every document start, while the plan needs them
        self.packing: Optional[BestFitPacking] = None   # pack='bestfit': the rows' documents
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


class Plan:
    """A loader's arguments, checked, and what follows from them; see GPULoader for the arguments."""

    def __init__(self, files, batch_size: int, seq_len: int, sampling: str = "random", seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, device=None,
                 input_dtype: torch.dtype = torch.int64, backend: str = "auto", token_dtype=np.uint16,
                 ring_tokens: Optional[int] = None, placement: str = "device", static_buffers: bool = False,
                 loop: bool = True, bos_token: Optional[int] = None, doc_info=False,
                 align: Optional[str] = None, weights: Optional[Mapping[str, float]] = None,
                 doc_capacity: Optional[int] = None, pack: Optional[str] = None, pack_remainder: bool = False):
        batch_size, seq_len, seed = _as_int("batch_size", batch_size), _as_int("seq_len", seq_len), _as_int("seed", seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if batch_size * seq_len >= MAX_BATCH_TOKENS:
            raise ValueError(f"batch_size * seq_len = {batch_size} * {seq_len} = {batch_size * seq_len} tokens per "
                             f"batch; gpuload takes fewer than 2**31 (doc_info's cu_seqlens are int32, and an int64 "
                             f"batch of x and y is 32 GiB at that bound): lower batch_size or seq_len")
        if not 0 <= seed < 1 << 64:
            raise ValueError(f"seed must be in [0, 2**64) (the batches hash its 64 bits, so a seed outside would "
                             f"alias one inside), got {seed}; pass seed % 2**64 if that is the one you mean")
        if sampling not in LOADER_SAMPLINGS:
            raise ValueError(f"sampling must be one of {LOADER_SAMPLINGS}, got {sampling!r}")
        if input_dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_dtype must be torch.int64 or torch.int32, got {input_dtype}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not loop and sampling not in ("sequential", "llmc"):
            raise ValueError(f"loop=False (one pass, for evaluation) needs sampling='sequential' (or 'llmc'), got "
                             f"{sampling!r}")
        if bos_token is not None:
            bos_token = _as_int("bos_token", bos_token)
        if doc_info is None or doc_info is False or doc_info == 0:
            doc_info = False  # as before doc_info="exact" existed: any false value is off
        if doc_info not in (False, True, "exact"):
            raise ValueError(f"doc_info must be False, True (fixed shapes, no sync) or 'exact' (trimmed, one sync per "
                             f"step), got {doc_info!r}")
        if doc_capacity is not None:
            doc_capacity = _as_int("doc_capacity", doc_capacity)
            if doc_info is not True:
                raise ValueError("doc_capacity= sets the fixed size of doc_info=True's cu_seqlens; pass doc_info=True")
            if not batch_size <= doc_capacity <= batch_size * seq_len:
                raise ValueError(f"doc_capacity must be in [batch_size, batch_size * seq_len] = [{batch_size}, "
                                 f"{batch_size * seq_len}] (every row has one segment at least, T at most), got "
                                 f"{doc_capacity}")
        if (doc_info or align) and bos_token is None:
            raise ValueError("doc_info=True and align='bos' need bos_token=ID: documents are delimited by that token")
        if align not in (None, "bos"):
            raise ValueError(f"align must be None or 'bos', got {align!r}")
        if pack not in (None, "bestfit"):
            raise ValueError(f"pack must be None or 'bestfit', got {pack!r}")
        if pack_remainder and not pack:
            raise ValueError("pack_remainder=True puts cropped tails back into best-fit packing; pass pack='bestfit'")
        if pack:
            if bos_token is None:
                raise ValueError("pack='bestfit' packs whole documents: pass bos_token=ID, the token that starts each")
            if sampling not in ("random", "shuffle"):
                raise ValueError(f"pack='bestfit' orders its rows by sampling='shuffle' (each row once per epoch) or "
                                 f"'random', got {sampling!r}")
            if align:
                raise ValueError("pack='bestfit' starts every row at a document already; drop align='bos'")
            if weights is not None or isinstance(files, Mapping):
                raise ValueError("pack='bestfit' packs one dataset so far; a mixture of packed sources is not built "
                                 "yet: pack each source with its own loader, or drop pack=")
            if not loop:
                raise ValueError("pack='bestfit' needs loop=True: one evaluation pass over packed rows is not built yet")
        if align and sampling == "llmc":
            raise ValueError("sampling='llmc' reads llm.c's fixed windows, which do not follow documents; use align='bos' "
                             "with sampling='random', 'shuffle' or 'sequential'")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if ring_tokens is not None:
            ring_tokens = _as_int("ring_tokens", ring_tokens)
            if ring_tokens < 1:
                raise ValueError(f"ring_tokens must be >= 1 (or None for the whole stream), got {ring_tokens}")
        # The environment only for what the arguments leave open: rank= and world_size= override a stray RANK.
        default_rank, default_world = default_rank_world() if rank is None or world_size is None else (0, 1)
        rank = default_rank if rank is None else _as_int("rank", rank)
        world_size = default_world if world_size is None else _as_int("world_size", world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if world_size * batch_size * seq_len > MAX_TOKENS:
            raise ValueError(f"world_size * batch_size * seq_len = {world_size} * {batch_size} * {seq_len} tokens per "
                             f"global batch; gpuload takes at most 2**62 (the largest stream), which keeps the "
                             f"sampling's step * global_batch + row within int64: lower world_size or batch_size")
        self.local_ranks = local_world_size()  # the ranks sharing this node's default ring budget

        self.batch_size, self.seq_len, self.sampling, self.seed = batch_size, seq_len, sampling, seed
        # The rule the kernels and rings follow: llm.c's order is the sequential rule over its row starts.
        self.rule = "sequential" if sampling == "llmc" else sampling
        self.rank, self.world_size = rank, world_size
        self.global_batch = world_size * batch_size
        self.input_dtype = input_dtype
        # Always with an index on CUDA: every device check compares against the tensors' own cuda:N.
        self.device = resolve_device(default_device() if device is None else device)
        self.placement, self.static_buffers, self.loop = placement, bool(static_buffers), bool(loop)
        self.bos_token, self.doc_info, self.align = bos_token, doc_info, align
        self.pack, self.pack_remainder = pack, bool(pack_remainder)
        self.doc_capacity: Optional[int] = None  # cu_seqlens entries of doc_info=True; None: exact (or no doc info)
        self.sources: list[Source] = []
        self._rows = torch.arange(rank * batch_size, (rank + 1) * batch_size, dtype=torch.int64)

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
            if sampling == "llmc":
                self._llmc_rows()
            if pack:
                self._plan_packing()
            if doc_info is True:
                self.doc_capacity = doc_capacity if doc_capacity is not None else self._doc_capacity_bound()
        except BaseException:
            self.close()
            raise

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
            if self.input_dtype == torch.int32:
                source.stream.check_int32_inputs()
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
        # The default is this rank's share of the node's budget: every loader of the rank takes one.
        budget = default_ring_bytes(self.local_ranks) // itemsize if ring_tokens is None else ring_tokens
        default = (f"the default ring budget ({budget} tokens: the node's divided among its {self.local_ranks} "
                   f"local rank(s), gpuload.ring.default_ring_bytes())")
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
                given = f"ring_tokens={ring_tokens}" if ring_tokens is not None else default
                rows = ", ".join(f"{source.name!r} {source.rows}" for source in self.sources)
                raise ValueError(
                    f"{given} is too small for this mixture: it is shared among the sources (one smaller than its "
                    f"even share is held whole, the others split the rest), and {short}; a source needs its whole "
                    f"stream or, if fewer, 4 page-aligned slots that each hold one global batch of its rows "
                    f"({rows} rows per step) at seq_len {self.seq_len}. "
                    f"Pass ring_tokens >= {low}.")
        for source, share in zip(self.sources, shares):
            try:
                source.layout = plan_ring(source.num_tokens, itemsize, self.seq_len, source.rows, share)
            except ValueError as e:
                if ring_tokens is not None:
                    raise
                raise ValueError(f"{default} is too small for {source.where()}: {e}; pass ring_tokens=, or lower "
                                 f"LOCAL_WORLD_SIZE if fewer ranks share this node") from None
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
            starts = document_starts(source.stream.arrays, self.bos_token, device=device)
            if self.doc_info is True:
                source.all_doc_starts = starts  # for the doc info capacity, then dropped
            source.doc_starts = usable_document_starts(starts, source.num_tokens, self.seq_len)
            if self.rule == "sequential":
                self._check_whole_ring(source, "sampling='sequential' with align='bos'")
                source.doc_starts = sequential_row_starts(source.doc_starts, self.seq_len)
            elif source.chunking is not None:
                source.aligned = AlignedChunking(source.chunking, source.doc_starts, NUM_SLOTS)
        except ValueError as e:
            raise ValueError(f"align='bos' in {source.where()}: {e}") from None

    def _llmc_rows(self) -> None:
        """sampling='llmc': the epoch's row starts in llm.c's order (gpuload/sampling.py), on the gather's device."""
        if self.mixed:
            raise ValueError("sampling='llmc' reproduces llm.c's loader, which reads one dataset; a mixture samples "
                             "its sources by weight: use sampling='sequential' with weights=, or one source")
        source = self.sources[0]
        self._check_whole_ring(source, "sampling='llmc'")
        shards = source.stream.shards
        starts = llmc_row_starts([shard.num_tokens for shard in shards], self.seq_len, self.global_batch,
                                 [shard.path for shard in shards])
        source.doc_starts = starts.to(self.device if self.backend == "triton" else torch.device("cpu"))

    def _plan_packing(self) -> None:
        """pack='bestfit': the documents' groups and their row counts (gpuload/packing.py), once."""
        source = self.sources[0]
        self._check_whole_ring(source, "pack='bestfit'")
        self._deal_packing(document_starts(source.stream.arrays, self.bos_token).numpy())
        self._positions = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)

    def _deal_packing(self, starts: np.ndarray) -> None:
        source = self.sources[0]
        try:
            source.packing = make_packing(starts, source.num_tokens, self.seq_len, self.seed,
                                          remainder=self.pack_remainder)
        except ValueError as e:
            raise ValueError(f"pack='bestfit' in {source.where()}: {e}") from None

    def set_seed(self, seed: int) -> None:
        """A resume with another seed: packing deals its groups by the seed, so it deals the same documents again
        (no new scan of the stream)."""
        self.seed = seed
        if self.pack:
            self._deal_packing(self.sources[0].packing.document_starts())

    def packed_positions(self, step: int, out: Optional[np.ndarray] = None) -> np.ndarray:
        """pack='bestfit': the stream positions of this rank's rows at `step`, (B, T+1) int64, -1 where a row
        holds a BOS the stream does not (a cropped tail put back); into `out`, by default one array kept for
        next()."""
        out = self._positions if out is None else out
        self.sources[0].packing.rows_positions(step, self.rank * self.batch_size, self.global_batch,
                                               self.sampling == "random", out)
        return out

    def _check_whole_ring(self, source: Source, what: str) -> None:
        """Rows read from a table of row starts need the whole stream in the ring (the native backend has none)."""
        if source.chunking is not None and self.backend != "native":
            raise ValueError(
                f"{what} reads rows from a table of row starts, which needs the whole stream in the ring; the ring "
                f"of {source.where()} holds {source.layout.ring_tokens} of its {source.num_tokens} tokens. Pass "
                f"ring_tokens={source.num_tokens} (if the memory is there), or backend='native' (it reads the shards' "
                f"memory maps in place)")

    def _doc_capacity_bound(self) -> int:
        """B times the most segments a row can hold in any source: no batch of this data overflows it.

        Needs every document start (a scan of the streams, the one align='bos' makes, on the gather's device)."""
        if self.pack:  # packed rows: a segment per piece at most
            return min(self.batch_size * self.sources[0].packing.max_pieces, self.batch_size * self.seq_len)
        most = 1
        device = self.device if self.backend == "triton" else torch.device("cpu")
        for source in self.sources:
            starts = source.all_doc_starts
            if starts is None:
                starts = document_starts(source.stream.arrays, self.bos_token, device=device)
            most = max(most, max_segments_per_row(starts, self.seq_len))
            source.all_doc_starts = None
        return min(self.batch_size * most, self.batch_size * self.seq_len)

    def _check_triton_device(self) -> None:
        from gpuload.kernels import triton_gather  # imported late: triton is slow to import

        if self.device.type == "cpu" and not triton_gather.interpreter_active():
            raise RuntimeError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported "
                               "(Triton's interpreter); use a CUDA device, or backend='native' on the CPU")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA devices (or the CPU interpreter), not {self.device}")

    @property
    def mixed(self) -> bool:
        return len(self.sources) > 1

    def row_sources(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(source, index) of each of this rank's rows at `step` (int64, CPU): the row's source in
        `self.sources` and its row among that source's c_k rows (the global row of its contract)."""
        if not self.mixed:
            return torch.zeros_like(self._rows), self._rows.clone()
        return mixture_rows(self.seed, step, self.counts, self._rows)

    def source_starts(self, source: Source, step: int, index: torch.Tensor):
        """(window starts, ring visits or None) of rows `index` of `source` at `step`."""
        if source.doc_starts is not None:
            return aligned_window_starts_and_visits(self.rule, self.seed, step, index.to(source.doc_starts.device),
                                                    source.rows, source.doc_starts, source.num_tokens, source.aligned)
        return window_starts_and_visits(self.rule, self.seed, step, index, source.rows, source.num_tokens,
                                        self.seq_len, source.chunking)

    def window_starts(self, step: int) -> torch.Tensor:
        """Window start of each of this rank's rows at `step` (int64, CPU), in the stream of the row's source
        (pack='bestfit': where the row's first piece starts)."""
        if self.pack:  # a row opening with a BOS the stream does not hold starts its piece one position on
            positions = torch.from_numpy(self.packed_positions(step, np.empty_like(self._positions)))
            return torch.where(positions[:, 0] >= 0, positions[:, 0], positions[:, 1])
        which, index = self.row_sources(step)
        starts = torch.empty_like(index)
        for k, source in enumerate(self.sources):
            mine = which == k
            if bool(mine.any()):
                starts[mine] = self.source_starts(source, step, index[mine])[0].cpu()
        return starts

    def epoch_windows(self, source: Source) -> int:
        """Rows of one epoch of `source`: its table of row starts (sequential rows, llm.c's order), else its windows."""
        if source.packing is not None:
            return source.packing.epoch_rows
        if self.rule == "sequential" and source.doc_starts is not None:
            return source.doc_starts.numel()
        return (source.num_tokens - 1) // self.seq_len

    @property
    def align_bos(self) -> Optional[int]:
        """The token rows are aligned to (align='bos'), else None."""
        return self.bos_token if self.align else None

    def close(self) -> None:
        for source in self.sources:
            source.close()
