"""Document boundaries: the document-start index, BOS-aligned window starts, and per-batch doc info.

A document starts at every position holding `bos_token`. Everything here is plain torch and runs on
whatever device its tensors are on; `gpuload/kernels/triton_docs.py` computes the same doc info in two
kernel launches and is held to `doc_info_reference` with `torch.equal`.

BOS-aligned sampling (`align="bos"`): a row's window starts at a document start `p` that leaves room
for a whole window, `p + T + 1 <= N` (the usable starts U, a prefix of the sorted index, D of them). A
document shorter than T simply continues into the next one: the window is the T + 1 stream tokens from
`p`, whatever boundaries they cross. Window starts stay pure functions of (seed, step, global row):
    h = mix64(mix64(mix64(seed ^ SALT_ALIGNED_RANDOM) + step) + g),   w = step*G + g
    random:  o = U[(h >> 1) mod D]                       uniform over the D usable starts
    shuffle: e = w // D,  o = U[perm(seed, e)(w mod D)]  every usable start exactly once per epoch
(arithmetic modulo 2**64, `>>` logical, perm = sampling.feistel_permute, as in gpuload/sampling.py).
    sequential: o = S[w mod R]                           the rows of an epoch in stream order
where S are the sequential row starts (`sequential_row_starts`, modded-nanogpt's align_to_bos rule): row 0
starts at U[0], row r+1 at the first usable start at or after S[r] + T (where row r's inputs end), R rows
an epoch. Sequential rows need the whole stream in the ring (or the native backend, which reads the maps).

With a ring smaller than the stream (`AlignedChunking`), chunk j of the ring's `sampling.Chunking` owns
the usable starts in [j*C, (j+1)*C) (the last chunk: to the end of the stream), D_j of them from index
P_j of U, and its ring slot holds the C + T tokens from j*C, so each of those windows is whole and every
usable start belongs to exactly one chunk. Chunks with D_j = 0 are never visited; the others, E (K_E of
them), are visited once per pass of D rows:
    e = w // D, i = w mod D; pass e visits E[perm(seed ^ SALT_CHUNKS, e)(q)] for q = 0 .. K_E-1, the
    chunk at position q taking the D_j rows from cum_e(q) = the D_j of positions < q;
    q: cum_e(q) <= i < cum_e(q+1),  j = its chunk,  r = i - cum_e(q),  visit v = e*K_E + q
    random:  o = U[P_j + (h >> 1) mod D_j]               uniform within the visit's chunk
    shuffle: o = U[P_j + perm(seed, v)(r) over D_j]      every usable start exactly once per pass
so in each pass chunk j serves exactly D_j rows: shuffle takes every start once, random draws each
start once on average, as with the whole stream. With K_E = 1 both reduce to the whole-stream rules.
The rows of a step span the visits from that of w = step*G to that of step*G + G - 1; the ring
holds at most 4 (the construction refuses chunks so sparse in documents that a step could span more).

Doc info for a batch x (B, T): a segment starts at each row start and at each `bos_token` (a bos in
column 0 starts the row's first segment, not an empty one). `position_ids[b, t]` counts from 0 at the
segment start, `cu_seqlens` (int32) lists the segment starts over the flattened B*T tokens followed by
B*T, as `flash_attn_varlen_func` takes it, and `max_seqlen` is the longest segment. Segments never
cross rows, so `max_seqlen == position_ids.max() + 1`.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from gpuload.sampling import (SALT_CHUNKS, Chunking, check_domain, feistel_half_bits, feistel_permute, mix64,
                              mix64_int, to_signed)

SALT_ALIGNED_RANDOM = 0x452821E638D01377  # more digits of pi, unlike every other salt: fixed forever
ALIGNED_MODES = ("random", "shuffle", "sequential")

# 16M tokens per chunk: a 16 MiB bool mask at a time, whatever the stream's length.
DEFAULT_CHUNK_TOKENS = 1 << 24

# Token widths by dtype: tokens are compared as the signed view with the same bits, so uint16/uint32
# need no op support beyond what every torch >= 2.3 device has.
_SIGNED_VIEW = {torch.uint16: (torch.int16, 16), torch.int16: (torch.int16, 16),
                torch.uint32: (torch.int32, 32), torch.int32: (torch.int32, 32), torch.int64: (torch.int64, 63)}
_NUMPY_SIGNED = {np.dtype(np.uint16): np.int16, np.dtype(np.int16): np.int16, np.dtype(np.uint32): np.int32,
                 np.dtype(np.int32): np.int32, np.dtype(np.int64): np.int64}

TokenArray = Union[torch.Tensor, np.ndarray]


def _bits_as_signed(value: int, bits: int) -> int:
    """The signed `bits`-bit integer with the same low bits as the non-negative `value` (bits 63: itself)."""
    if bits == 63:
        return value
    return value - (1 << bits) if value >= 1 << (bits - 1) else value


def _check_bos(bos_token, bits: int, where: str) -> int:
    if isinstance(bos_token, bool) or not isinstance(bos_token, (int, np.integer)):
        raise ValueError(f"{where}: bos_token must be an integer token id, found {type(bos_token).__name__}")
    bos_token = int(bos_token)
    if not 0 <= bos_token < 1 << bits:
        raise ValueError(f"{where}: bos_token must be in [0, 2**{bits}) for {bits if bits != 63 else 64}-bit tokens, "
                         f"found {bos_token}; pass the id of the tokenizer's document delimiter")
    return bos_token


def _piece_width(piece: TokenArray) -> int:
    """Token width in bits (63 for int64 ids) of one 1-D token array; ValueError for anything else."""
    if isinstance(piece, torch.Tensor) and piece.dim() == 1 and piece.dtype in _SIGNED_VIEW:
        return _SIGNED_VIEW[piece.dtype][1]
    if isinstance(piece, np.ndarray) and piece.ndim == 1 and piece.dtype in _NUMPY_SIGNED:
        return {2: 16, 4: 32}.get(piece.dtype.itemsize, 63)
    if isinstance(piece, (torch.Tensor, np.ndarray)):
        found = f"{piece.ndim}-D {piece.dtype}"
    else:
        found = type(piece).__name__
    raise ValueError(f"document_starts: expected 1-D uint16/uint32/int16/int32/int64 tokens, found {found}; pass "
                     f"the stream, or its shards in order (TokenStream.arrays), as 1-D tensors or arrays")


def _signed_chunks(piece: TokenArray, chunk_tokens: int, device):
    """(offset in the piece, signed-view tensor on `device`) for consecutive chunks of a 1-D token array."""
    if isinstance(piece, torch.Tensor):
        signed = _SIGNED_VIEW[piece.dtype][0]
        for start in range(0, piece.numel(), chunk_tokens):
            yield start, piece[start:start + chunk_tokens].contiguous().view(signed).to(device)
        return
    signed = _NUMPY_SIGNED[piece.dtype]
    for start in range(0, piece.size, chunk_tokens):
        # np.array copies the chunk: a read-only memmap cannot back a tensor, and only a chunk is resident.
        chunk = np.array(piece[start:start + chunk_tokens]).view(signed)
        yield start, torch.from_numpy(chunk).to(device)


def document_starts(tokens: Union[TokenArray, Sequence[TokenArray]], bos_token: int,
                    device: Optional[Union[str, torch.device]] = None,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Sorted stream positions (int64, on `device`) of every token equal to `bos_token`.

    `tokens` is the stream as one 1-D tensor or NumPy array (a memmap is fine), or a sequence of them,
    the shards in stream order (`TokenStream.arrays`); positions count across the whole sequence.
    uint16/uint32 tokens (or their int16/int32 views) are compared as unsigned ids. The work runs in
    chunks of `chunk_tokens` on `device` (default: the first tensor's device, the CPU for NumPy), so a
    multi-GB stream needs a chunk-sized mask, never an int64 copy of itself; on CUDA each chunk's
    nonzero() synchronizes once, which is fine for an index built once.
    """
    pieces = list(tokens) if isinstance(tokens, (list, tuple)) else [tokens]
    if not pieces:
        raise ValueError("document_starts: expected a token array or a non-empty sequence of them, found an "
                         "empty sequence")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"document_starts: chunk_tokens must be a positive int, found {chunk_tokens!r}")
    if device is None:
        first = pieces[0]
        device = first.device if isinstance(first, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    found, offset = [], 0
    for piece in pieces:
        bits = _piece_width(piece)
        bos = _bits_as_signed(_check_bos(bos_token, bits, "document_starts"), bits)
        for start, chunk in _signed_chunks(piece, chunk_tokens, device):
            hits = torch.nonzero(chunk == bos).flatten()
            if hits.numel():
                found.append(hits + (offset + start))
        offset += piece.numel() if isinstance(piece, torch.Tensor) else piece.size
    if not found:
        return torch.empty(0, dtype=torch.int64, device=device)
    return torch.cat(found)


def usable_document_starts(doc_starts: torch.Tensor, num_tokens: int, seq_len: int) -> torch.Tensor:
    """The prefix of the sorted `doc_starts` where a whole window fits: p + seq_len + 1 <= num_tokens.

    Raises ValueError when there is none. One host sync (the prefix length), for a value built once.
    """
    if seq_len < 1 or num_tokens < seq_len + 1:
        raise ValueError(f"usable_document_starts: need seq_len >= 1 and num_tokens >= seq_len + 1, found "
                         f"seq_len={seq_len}, num_tokens={num_tokens}")
    limit = torch.tensor(num_tokens - seq_len, dtype=torch.int64, device=doc_starts.device)
    count = int(torch.searchsorted(doc_starts, limit))
    if count == 0:
        where = f"none in the stream of {num_tokens} tokens" if doc_starts.numel() == 0 else \
            f"{doc_starts.numel()}, the first at position {int(doc_starts[0])}"
        raise ValueError(f"align='bos' needs a document start at a position p with p + seq_len + 1 <= num_tokens "
                         f"(seq_len={seq_len}, num_tokens={num_tokens}); found document starts: {where}. Check "
                         f"bos_token (the manifest's delimiter token) or lower seq_len")
    return doc_starts[:count]


def _aligned_hash(seed: int, step: int, rows: torch.Tensor) -> torch.Tensor:
    """(h >> 1) of the aligned rules for global rows `rows` at `step`: a non-negative int64."""
    base = mix64_int(mix64_int(seed ^ SALT_ALIGNED_RANDOM) + step)
    h = mix64(rows + to_signed(base))
    return (h >> 1) & ((1 << 63) - 1)  # logical shift: torch's >> on int64 is arithmetic


class AlignedChunking:
    """align='bos' on a ring smaller than the stream: the usable document starts grouped by the ring's chunks.

    Built once from `chunking` (gpuload.sampling.Chunking) and the usable starts (any device; only
    K + 1 counts come to the host). Holds the per-chunk counts and, per pass, the chunk order and
    cumulative rows (the module docstring's cum_e), cached for the passes in use. Everything a step
    needs on the host (its ring visits, the kernel's pass table) is O(log K) from there.
    """

    def __init__(self, chunking: Chunking, starts: torch.Tensor, max_step_visits: int):
        K, C = chunking.num_chunks, chunking.chunk_tokens
        bounds = torch.arange(K + 1, dtype=torch.int64, device=starts.device) * C
        first = torch.searchsorted(starts, bounds).tolist()
        first[K] = starts.numel()
        self.chunking = chunking
        self.num_starts = starts.numel()
        self.first = first[:K]                                   # P_j
        self.counts = [first[j + 1] - first[j] for j in range(K)]  # D_j
        self.nonempty = [j for j in range(K) if self.counts[j]]  # E
        self._passes: dict = {}
        self._tables: dict = {}
        self._lock = threading.Lock()
        self._check_step_span(max_step_visits)

    def _check_step_span(self, max_step_visits: int) -> None:
        G, D = self.chunking.global_batch, self.num_starts
        if G > D:
            raise ValueError(f"align='bos' on a ring smaller than the stream needs at least one global batch of usable "
                             f"document starts, found {D} for a global batch of {G}: pass ring_tokens >= "
                             f"{self.chunking.num_tokens} to hold the whole stream, or lower the batch")
        # The rows of a step cover the end of one visit, whole visits in between, and the start of another;
        # a step reaches at most two passes, so each chunk can be in between twice. Worst case: the smallest.
        room, between, sparse = G - 2, 0, []
        for count, j in sorted((self.counts[j], j) for j in self.nonempty for _ in range(2)):
            if count > room:
                break
            room -= count
            between += 1
            sparse.append(j)
        if between + 2 > max_step_visits:
            chunks = sorted(set(sparse))
            raise ValueError(
                f"align='bos' on a ring smaller than the stream: chunk(s) {chunks} of "
                f"{self.chunking.chunk_tokens} tokens hold only {[self.counts[j] for j in chunks]} usable document "
                f"starts, so the {G} rows of one step could read {between + 2} chunks, more than the ring's "
                f"{max_step_visits} slots hold: pass a larger ring_tokens (longer chunks, more documents each) or a "
                f"smaller batch")

    @property
    def num_visited(self) -> int:
        """K_E: the chunks holding at least one usable start, each visited once per pass."""
        return len(self.nonempty)

    @property
    def span_tokens(self) -> int:
        """Tokens a ring slot must hold for a chunk: C + T (the last chunk, up to the stream's end, is no longer)."""
        return self.chunking.chunk_tokens + self.chunking.seq_len

    def span(self, chunk: int) -> tuple[int, int]:
        """(first stream position, tokens) a visit of `chunk` loads: the windows of every start it owns."""
        start = chunk * self.chunking.chunk_tokens
        return start, min(self.span_tokens, self.chunking.num_tokens - start)

    def pass_order(self, seed: int, epoch: int) -> tuple[list[int], list[int]]:
        """(chunks by position, cum) of pass `epoch`: cum[q] rows of the pass precede position q (K_E + 1 values)."""
        key = (seed, epoch)
        with self._lock:  # the ring's fill thread asks too
            found = self._passes.get(key)
        if found is None:
            n = self.num_visited
            positions = feistel_permute(torch.arange(n), torch.full((n,), epoch, dtype=torch.int64),
                                        seed ^ SALT_CHUNKS, n).tolist()
            order = [self.nonempty[q] for q in positions]
            found = (order, [0, *itertools.accumulate(self.counts[j] for j in order)])
            with self._lock:
                if len(self._passes) >= 8:  # a step reads two passes at most; a few more serve the fill thread
                    self._passes.pop(next(iter(self._passes)))
                self._passes[key] = found
        return found

    def locate(self, seed: int, w: int) -> tuple[int, int]:
        """(pass, position) of row w = step*G + g, i.e. of its visit pass*K_E + position."""
        epoch, i = divmod(w, self.num_starts)
        return epoch, bisect.bisect_right(self.pass_order(seed, epoch)[1], i) - 1

    def visit(self, seed: int, w: int) -> int:
        epoch, position = self.locate(seed, w)
        return epoch * self.num_visited + position

    def visit_chunk(self, seed: int, visit: int) -> int:
        """The chunk that visit `visit` brings into the ring."""
        epoch, position = divmod(visit, self.num_visited)
        return self.pass_order(seed, epoch)[0][position]

    def step_visits(self, seed: int, step: int) -> tuple[int, int]:
        """First and last visit that the global rows of `step` read from."""
        first = step * self.chunking.global_batch
        return self.visit(seed, first), self.visit(seed, first + self.chunking.global_batch - 1)

    def step_table(self, seed: int, step: int, device=None) -> tuple[int, int, torch.Tensor]:
        """(pass0, pos0, pass_table(seed, pass0, device)) for `step`: the pass and position of its first row's
        visit, from which the kernel and the native code place every row of the step."""
        pass0, pos0 = self.locate(seed, step * self.chunking.global_batch)
        return pass0, pos0, self.pass_table(seed, pass0, device)

    def pass_table(self, seed: int, epoch: int, device=None) -> torch.Tensor:
        """int64 (4, 2*K_E + 1) on `device` (default CPU): cum, P_j, D_j and feistel_half_bits(D_j) by position
        over passes epoch and epoch + 1 laid end to end (the second pass's cum offset by D), cum ending at 2D:
        what the Triton kernel and the native code read to place a row w with epoch*D <= w < (epoch + 2)*D.
        The last two tables asked for stay cached: a new one is built (and copied) once per pass."""
        device = torch.device("cpu") if device is None else torch.device(device)
        key = (seed, epoch, device)
        with self._lock:
            found = self._tables.get(key)
        if found is not None:
            return found
        order0, cum0 = self.pass_order(seed, epoch)
        order1, cum1 = self.pass_order(seed, epoch + 1)
        order = order0 + order1
        counts = [self.counts[j] for j in order]
        rows = [cum0[:-1] + [self.num_starts + c for c in cum1], [self.first[j] for j in order] + [0], counts + [1],
                [feistel_half_bits(c) for c in counts] + [1]]
        # From the host; a copy of a CPU tensor to CUDA is ordered after the launches queued before it.
        found = torch.tensor(rows, dtype=torch.int64).to(device)
        with self._lock:
            if len(self._tables) >= 2:
                self._tables.pop(next(iter(self._tables)))
            self._tables[key] = found
        return found


def _chunked_aligned_starts(sampling: str, seed: int, step: int, rows: torch.Tensor, starts: torch.Tensor,
                            chunks: AlignedChunking) -> tuple[torch.Tensor, torch.Tensor]:
    D, visited = chunks.num_starts, chunks.num_visited
    w = rows + step * chunks.chunking.global_batch
    epoch, i = w // D, w % D
    first = torch.tensor(chunks.first, device=rows.device)
    counts = torch.tensor(chunks.counts, device=rows.device)
    index, visits = torch.empty_like(w), torch.empty_like(w)
    for e in torch.unique(epoch).tolist():
        sel = epoch == e
        order, cum = (torch.tensor(part, device=rows.device) for part in chunks.pass_order(seed, e))
        position = torch.searchsorted(cum, i[sel], right=True) - 1
        chunk = order[position]
        visits[sel] = e * visited + position
        if sampling == "random":
            index[sel] = first[chunk] + _aligned_hash(seed, step, rows[sel]) % counts[chunk]
            continue
        within = i[sel] - cum[position]
        picked = torch.empty_like(within)
        for j in torch.unique(chunk).tolist():  # each chunk permutes its own D_j starts
            mine = chunk == j
            picked[mine] = chunks.first[j] + feistel_permute(within[mine], visits[sel][mine], seed, chunks.counts[j])
        index[sel] = picked
    return starts[index], visits


def sequential_row_starts(usable_starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The rows of one epoch of align='bos' with sampling='sequential' (module docstring), on the starts' device.

    Row r+1 starts at the first usable start at or after row r's start + T. The chain is followed by pointer
    doubling: `jump` maps a start's index to the index 2**j rows on, so each round doubles the rows known, in
    O(D) vectorized work a round and log2(R) rounds (one host sync each), built once."""
    count = usable_starts.numel()
    if count == 0:
        raise ValueError("sequential_row_starts: no usable document starts")
    device = usable_starts.device
    # next[i]: the index of the row after a row at U[i]; `count` (past the end) maps to itself.
    jump = torch.cat([torch.searchsorted(usable_starts, usable_starts + seq_len),
                      torch.tensor([count], device=device)])
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    while int(rows[-1]) < count:
        rows = torch.cat([rows, jump[rows]])
        jump = jump[jump]
    return usable_starts[rows[rows < count]]


def aligned_window_starts_and_visits(sampling: str, seed: int, step: int, rows: torch.Tensor, global_batch: int,
                                     starts: torch.Tensor, num_tokens: int,
                                     chunks: Optional[AlignedChunking] = None
                                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(window starts, ring visits or None) for align='bos': `starts` are the usable document starts
    (int64, sorted; for sequential, the epoch's row starts); `chunks` selects the rule for a ring smaller
    than the stream.

    `rows` and `starts` must be on the same device; the results (int64) are there too. Shuffle's cycle
    walk synchronizes with the host once per walk, as `sampling.feistel_permute` does.
    """
    check_domain(step, global_batch, num_tokens)
    if starts.dim() != 1 or starts.numel() == 0 or starts.dtype != torch.int64:
        raise ValueError(f"aligned_window_starts: starts must be a non-empty 1-D int64 tensor of usable document "
                         f"starts (usable_document_starts), found {tuple(starts.shape)} {starts.dtype}")
    if sampling not in ALIGNED_MODES:
        raise ValueError(f"align='bos' works with sampling in {ALIGNED_MODES}, found {sampling!r}")
    rows = rows.to(torch.int64)
    if sampling == "sequential":  # `starts` are the epoch's row starts (sequential_row_starts, or llm.c's order)
        if chunks is not None:
            raise ValueError("aligned_window_starts: sequential rows follow the whole stream; they have no chunked rule")
        return starts[(rows + step * global_batch) % starts.numel()], None
    if chunks is not None:
        if chunks.chunking.global_batch != global_batch or chunks.num_starts != starts.numel():
            raise ValueError(f"aligned_window_starts: the AlignedChunking was built for global batch "
                             f"{chunks.chunking.global_batch} and {chunks.num_starts} starts, not {global_batch} and "
                             f"{starts.numel()}")
        return _chunked_aligned_starts(sampling, seed, step, rows, starts, chunks)
    num_starts = starts.numel()
    if sampling == "random":
        return starts[_aligned_hash(seed, step, rows) % num_starts], None
    w = rows + step * global_batch
    return starts[feistel_permute(w % num_starts, w // num_starts, seed, num_starts)], None


def aligned_window_starts(sampling: str, seed: int, step: int, rows: torch.Tensor, global_batch: int,
                          starts: torch.Tensor, num_tokens: int,
                          chunks: Optional[AlignedChunking] = None) -> torch.Tensor:
    """`sampling.window_starts` for align='bos' (see `aligned_window_starts_and_visits`)."""
    return aligned_window_starts_and_visits(sampling, seed, step, rows, global_batch, starts, num_tokens, chunks)[0]


def max_segments_per_row(doc_starts: torch.Tensor, seq_len: int) -> int:
    """The most doc-info segments a row of `seq_len` stream tokens can hold: B times it is a safe capacity.

    A row [o, o+T) has one segment from column 0 plus one per document start in columns 1 .. T-1, so
    the bound is 1 + the most starts in any T-1 consecutive positions (attained from a start). Rows
    that would run past the stream's end count too, so it can exceed the true maximum by a little.
    """
    if seq_len < 1:
        raise ValueError(f"max_segments_per_row: seq_len must be >= 1, found {seq_len}")
    if seq_len == 1 or doc_starts.numel() == 0:
        return 1
    after = torch.searchsorted(doc_starts, doc_starts + (seq_len - 1))
    index = torch.arange(doc_starts.numel(), device=doc_starts.device)
    return 1 + int((after - index).max())


class DocInfo(NamedTuple):
    """Per-document metadata of a batch x (B, T); see the module docstring for the definitions."""

    position_ids: torch.Tensor  # (B, T) int64
    cu_seqlens: torch.Tensor  # int32: num_segments + 1 values, or capacity + 1 padded with B*T
    max_seqlen: Union[int, torch.Tensor]  # int, or a 0-d int32 tensor when a capacity is given
    num_segments: Union[int, torch.Tensor]  # int, or a 0-d int32 tensor when a capacity is given


def check_doc_info_args(x, bos_token, capacity, where: str) -> int:
    """Validate a doc-info call; returns bos_token as the bits x holds it with (int32 x: signed 32-bit)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in (torch.int32, torch.int64):
        found = f"{x.dim()}-D {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{where}: x must be a (B, T) int64 or int32 batch, found {found}")
    batch, seq_len = x.shape
    if batch < 1 or seq_len < 1 or batch * seq_len >= 1 << 31:
        raise ValueError(f"{where}: need B >= 1, T >= 1 and B*T < 2**31 (cu_seqlens is int32), found "
                         f"B={batch}, T={seq_len}")
    bits = 32 if x.dtype == torch.int32 else 63
    bos = _bits_as_signed(_check_bos(bos_token, bits, where), bits)
    if capacity is not None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not batch <= capacity <= batch * seq_len:
            raise ValueError(f"{where}: capacity must be an int in [B, B*T] = [{batch}, {batch * seq_len}] (every "
                             f"row has at least one segment, at most T), found {capacity!r}; "
                             f"B * max_segments_per_row(doc_starts, T) is a safe value")
    return bos


def doc_info_reference(x: torch.Tensor, bos_token: int, capacity: Optional[int] = None) -> DocInfo:
    """Plain-torch doc info of a batch x (B, T); the reference the Triton kernels are held to.

    Without `capacity`: cu_seqlens has exactly num_segments + 1 values and max_seqlen / num_segments are
    ints. With `capacity` (CUDA graphs: fixed shapes): cu_seqlens has capacity + 1 values, the entries
    after the last segment repeat B*T (empty segments), max_seqlen and num_segments are 0-d int32
    tensors. Segment starts past the capacity are dropped (the last segment then runs to B*T), so pick
    capacity >= B * max_segments_per_row(doc_starts, T); num_segments is always the true count.
    """
    bos = check_doc_info_args(x, bos_token, capacity, "doc_info_reference")
    batch, seq_len = x.shape
    cols = torch.arange(seq_len, device=x.device)
    is_start = x == bos
    is_start[:, 0] = True
    segment_start = torch.where(is_start, cols, 0).cummax(dim=1).values
    position_ids = cols - segment_start
    starts = torch.nonzero(is_start.flatten()).flatten().to(torch.int32)
    total = batch * seq_len
    max_seqlen = position_ids.max() + 1
    if capacity is None:
        end = torch.tensor([total], dtype=torch.int32, device=x.device)
        return DocInfo(position_ids, torch.cat([starts, end]), int(max_seqlen), starts.numel())
    cu_seqlens = torch.full((capacity + 1,), total, dtype=torch.int32, device=x.device)
    kept = starts[:capacity]
    cu_seqlens[:kept.numel()] = kept
    num_segments = torch.tensor(starts.numel(), dtype=torch.int32, device=x.device)
    return DocInfo(position_ids, cu_seqlens, max_seqlen.to(torch.int32), num_segments)
