"""Best-fit packing of whole documents into rows: the rule and its plain-Python reference.

The loader's `pack="bestfit"` follows it: the rows' stream positions are planned on the host (by the C++
port, csrc/packing.cpp, when the native extension is built) and gathered by each backend. The tests hold
the port to this reference, and `benchmarks/bench_packing.py` measures the rule against nanochat's
BestFit-Crop on the same documents.

Rule. A row is R = T + 1 stream tokens (x = row[:-1], y = row[1:]) and always starts with BOS.
- Documents: d = 0 .. D-1 are the stretches [P_d, P_{d+1}) between consecutive BOS positions (the last one
  to the end of the stream); tokens before the first BOS belong to no document.
- Groups: documents are dealt into J = ceil(D / K) groups of K once, by a seeded permutation of their
  indices: group j holds documents perm(seed ^ SALT_PACK_GROUPS, 0)(i) for i in [j*K, (j+1)*K).
- Packing a group (BestFit-Crop, as nanochat packs its buffer): pieces start as the group's documents.
  Each row starts empty with R tokens of space; while space is left, place the longest piece that fits
  whole; when none fits, crop the shortest: its first `space` tokens fill the row. The cropped tail is
  dropped, or with `remainder=True` it goes back into the group as a piece of its own behind a BOS (the
  row then holds a BOS the stream does not have at that point: `Piece.bos`). The group's rows are the ones
  it fills; a row left partial when its pieces run out is dropped. Among pieces of equal length, the one
  earlier in the group's order for this epoch, perm(seed ^ SALT_PACK_ORDER, epoch*J + j) over its K
  documents, is taken first, so which document goes where changes per epoch while the shape of the
  packing does not: every decision depends only on the pieces' lengths, so group j packs into the same
  number of rows R_j every epoch, and the rows of an epoch are R_E = sum of R_j.
- Rows of an epoch: w = step*G + g, epoch e = w // R_E, i = w mod R_E; the groups come in the order
  perm(seed ^ SALT_PACK_GROUPS, e + 1) over J, each taking R_j consecutive rows of the epoch, and its
  rows in the order perm(seed, e*J + j) over R_j (sampling="random": the same group, a row of it drawn
  uniformly by a hash of (seed, step, g)). So a global row is a pure function of (seed, step, g), G and
  the documents; finding it costs one group's packing (O(K log K)), plus R_j for all groups once.

Measured (benchmarks/bench_packing.py, one epoch of the same documents): see the README's "Packing".
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import numpy as np
import torch

from gpuload.sampling import feistel_permute, mix64_int

SALT_PACK_GROUPS = 0x082EFA98EC4E6C89  # more digits of pi: fixed forever, they define the rows
SALT_PACK_ORDER = 0x3F84D5B5B5470917
SALT_PACK_RANDOM = 0x0801F2E2858EFC16


@dataclass(frozen=True)
class Piece:
    """`length` row tokens from stream position `start`; with `bos`, the first is a BOS the stream does not
    hold there and the other length - 1 come from `start` (a cropped tail put back, remainder=True)."""

    start: int
    length: int
    bos: bool = False


def _permutation(count: int, epoch: int, seed: int) -> list[int]:
    """perm(seed, epoch) of [0, count) (gpuload.sampling.feistel_permute), as a list."""
    if count == 1:
        return [0]
    return feistel_permute(torch.arange(count), torch.tensor(epoch), seed, count).tolist()


class BestFitPacking:
    """The rows of best-fit packing over a stream of `num_tokens` with BOS at the sorted `doc_starts`."""

    def __init__(self, doc_starts, num_tokens: int, seq_len: int, seed: int = 0, group_docs: int = 1000,
                 remainder: bool = False):
        starts = [int(p) for p in doc_starts]
        if not starts:
            raise ValueError("best-fit packing needs documents: the stream holds no BOS")
        if group_docs < 1 or seq_len < 1:
            raise ValueError(f"need group_docs >= 1 and seq_len >= 1, got {group_docs} and {seq_len}")
        self.starts = starts
        self.lengths = [b - a for a, b in zip(starts, starts[1:] + [num_tokens])]
        self.row_tokens = seq_len + 1
        self._columns = np.arange(self.row_tokens, dtype=np.int64)
        self.seed, self.remainder, self.group_docs = seed, remainder, group_docs
        self.num_docs = len(starts)
        self.num_groups = -(-self.num_docs // group_docs)
        self.deal = _permutation(self.num_docs, 0, seed ^ SALT_PACK_GROUPS)
        # Rows per group: the same every epoch (the packing's shape depends on the lengths alone).
        packed = [self._pack(j, 0) for j in range(self.num_groups)]
        self.group_rows = [len(rows) for rows in packed]
        # Pieces in a row: the doc info's segments per row are at most this (the same every epoch).
        self.max_pieces = max((len(row) for rows in packed for row in rows), default=1)
        self.epoch_rows = sum(self.group_rows)
        if self.epoch_rows == 0:
            raise ValueError(f"best-fit packing: no group of {group_docs} documents fills a row of {self.row_tokens} "
                             f"tokens; use a smaller seq_len or more data")
        self._packed = lru_cache(maxsize=4)(self._pack)
        self._group_order = lru_cache(maxsize=2)(self._order_of_groups)
        self._row_order = lru_cache(maxsize=8)(
            lambda group, epoch: _permutation(self.group_rows[group], epoch * self.num_groups + group, self.seed))

    def document_starts(self) -> np.ndarray:
        """The documents' starts this packing was made from (sorted int64), to deal them again with another seed."""
        return np.asarray(self.starts, dtype=np.int64)

    def group_documents(self, group: int) -> list[int]:
        """The documents of group `group`, in the dealing order."""
        return self.deal[group * self.group_docs:(group + 1) * self.group_docs]

    def _pack(self, group: int, epoch: int) -> list[list[Piece]]:
        """Group `group`'s rows in packing order at `epoch` (module docstring)."""
        docs = self.group_documents(group)
        order = _permutation(len(docs), epoch * self.num_groups + group, self.seed ^ SALT_PACK_ORDER)
        # Pieces sorted by (length, rank in this epoch's order): the longest that fits is the last one <= space.
        pool = sorted((self.lengths[docs[k]], rank, self.starts[docs[k]], False) for rank, k in enumerate(order))
        rows, tiebreak = [], len(docs)
        while pool:
            row, space = [], self.row_tokens
            while space and pool:
                at = bisect.bisect_right(pool, (space, float("inf"))) - 1
                if at >= 0:
                    at = bisect.bisect_left(pool, (pool[at][0], -1))  # the longest that fits, earliest first
                    length, _, start, bos = pool.pop(at)
                    row.append(Piece(start, length, bos))
                    space -= length
                    continue
                length, _, start, bos = pool.pop(0)  # nothing fits: crop the shortest to fill the row
                row.append(Piece(start, space, bos))
                tail = length - space  # tokens of the piece left over; its stream position moves on with them
                if self.remainder:
                    bisect.insort(pool, (tail + 1, tiebreak, start + space - (1 if bos else 0), True))
                    tiebreak += 1
                space = 0
            if space == 0:
                rows.append(row)
        return rows

    def _order_of_groups(self, epoch: int) -> tuple[list[int], list[int]]:
        """The groups in epoch `epoch`'s order, and the epoch row where each begins."""
        order = _permutation(self.num_groups, epoch + 1, self.seed ^ SALT_PACK_GROUPS)
        first, begins = 0, []
        for group in order:
            begins.append(first)
            first += self.group_rows[group]
        return order, begins

    def row(self, step: int, g: int, global_batch: int, random: bool = False) -> list[Piece]:
        """The pieces of global row `g` at `step` (global batch `global_batch`), in row order.

        random=True (sampling="random"): the group is the one the rows in turn would visit, and the row within it
        is drawn uniformly, (h >> 1) mod R_j with h = mix64(mix64(mix64(seed ^ SALT_PACK_RANDOM) + step) + g), so
        a step still packs at most the groups it visits."""
        w = step * global_batch + g
        epoch, i = divmod(w, self.epoch_rows)
        order, begins = self._group_order(epoch)
        at = bisect.bisect_right(begins, i) - 1
        while self.group_rows[order[at]] == 0:  # a group that fills no row begins where the next one does
            at += 1
        group, r = order[at], i - begins[at]
        if random:
            r = (mix64_int(mix64_int(mix64_int(self.seed ^ SALT_PACK_RANDOM) + step) + g) >> 1) % self.group_rows[group]
        else:
            r = self._row_order(group, epoch)[r]
        return self._packed(group, epoch)[r]

    def positions(self, pieces: list[Piece], out) -> None:
        """The row's R stream positions into `out` (length R, int64): -1 where a piece's BOS is not the stream's."""
        col = 0
        for piece in pieces:
            first = col
            if piece.bos:
                out[col] = -1
                first = col + 1
            end = col + piece.length
            np.add(self._columns[first:end], piece.start - first, out=out[first:end])
            col = end

    def rows_positions(self, step: int, row0: int, global_batch: int, random: bool, out) -> None:
        """Global rows row0 .. row0+len(out)-1 at `step` as stream positions into `out` ((count, R) int64)."""
        for b in range(out.shape[0]):
            self.positions(self.row(step, row0 + b, global_batch, random), out[b])

    def materialize(self, pieces: list[Piece], tokens, bos_token: int) -> list[int]:
        """The row's R tokens from the stream `tokens` (any indexable of ints)."""
        out = []
        for piece in pieces:
            if piece.bos:
                out.append(bos_token)
                out.extend(int(t) for t in tokens[piece.start:piece.start + piece.length - 1])
            else:
                out.extend(int(t) for t in tokens[piece.start:piece.start + piece.length])
        return out


def make_packing(doc_starts, num_tokens: int, seq_len: int, seed: int = 0, group_docs: int = 1000,
                 remainder: bool = False):
    """The planner a loader uses: the C++ port (csrc/packing.cpp, held to BestFitPacking by the tests) when the
    native extension is built, else BestFitPacking. Both have epoch_rows, max_pieces, group_rows and
    rows_positions()."""
    from gpuload import native

    if native.available():
        try:
            return native.module().BestFitPlanner(np.asarray(doc_starts, dtype=np.int64), num_tokens, seq_len,
                                                  seed, group_docs, remainder)
        except ValueError as e:
            raise ValueError(str(e)) from None
    return BestFitPacking(doc_starts, num_tokens, seq_len, seed, group_docs, remainder)


def packing_stats(packing: BestFitPacking, total_tokens: Optional[int] = None) -> dict:
    """One epoch's utilization figures: rows, document tokens placed, cropped away, and pieces per row."""
    placed = pieces = synthetic = 0
    for group in range(packing.num_groups):
        for row in packing._pack(group, 0):
            pieces += len(row)
            for piece in row:
                synthetic += piece.bos
                placed += piece.length - piece.bos
    total = sum(packing.lengths) if total_tokens is None else total_tokens
    rows = packing.epoch_rows
    return {"rows": rows, "document_tokens": total, "placed": placed, "cropped_fraction": 1 - placed / total,
            "pieces_per_row": pieces / rows, "synthetic_bos_per_row": synthetic / rows, "utilization": 1.0}
