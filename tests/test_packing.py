"""Best-fit packing (gpuload/packing.py) against an oracle written from its docstring, and its promises:
rows of T+1 tokens that start with BOS, pieces that are stretches of one document, every document once per
epoch, nothing cropped with remainder=True, and rows that are pure functions of (seed, step, g) and G."""

import numpy as np
import pytest
import torch

from gpuload.packing import SALT_PACK_GROUPS, SALT_PACK_ORDER, BestFitPacking, Piece, packing_stats
from gpuload.sampling import feistel_permute

BOS = 0


def documents(num_docs, seed=0, mean=40, long_every=7, T=32):
    """A stream of documents (BOS then tokens), some longer than a row; returns (tokens, doc starts)."""
    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1 / mean, num_docs) + 1
    lengths[::long_every] += 2 * T  # longer than a row: they must be cropped (or split, with remainder)
    tokens = rng.integers(1, 1000, int(lengths.sum()))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    tokens[starts] = BOS
    return tokens, starts


def perm(count, epoch, seed):
    return [0] if count == 1 else feistel_permute(torch.arange(count), torch.tensor(epoch), seed, count).tolist()


def oracle_pack(lengths, starts, docs, order, row_tokens, remainder):
    """The docstring's BestFit-Crop, by plain list scans: pieces are [length, rank, start, bos]."""
    pool = [[lengths[docs[k]], rank, starts[docs[k]], False] for rank, k in enumerate(order)]
    rows, next_rank = [], len(docs)
    while pool:
        row, space = [], row_tokens
        while space and pool:
            fitting = [p for p in pool if p[0] <= space]
            if fitting:
                best = max(fitting, key=lambda p: (p[0], -p[1]))  # the longest; among equals the earliest
                pool.remove(best)
                row.append(Piece(best[2], best[0], best[3]))
                space -= best[0]
            else:
                shortest = min(pool, key=lambda p: (p[0], p[1]))
                pool.remove(shortest)
                length, _, start, bos = shortest
                row.append(Piece(start, space, bos))
                if remainder:  # the tail behind a BOS: its stream tokens follow those placed
                    pool.append([length - space + 1, next_rank, start + space - (1 if bos else 0), True])
                    next_rank += 1
                space = 0
        if space == 0:
            rows.append(row)
    return rows


@pytest.mark.parametrize("remainder", [False, True])
@pytest.mark.parametrize("group_docs,T", [(5, 8), (16, 32), (50, 32), (1, 16)])
def test_groups_pack_as_the_oracle(remainder, group_docs, T):
    tokens, starts = documents(120, T=T)
    packing = BestFitPacking(starts, tokens.size, T, seed=7, group_docs=group_docs, remainder=remainder)
    lengths = packing.lengths
    deal = perm(len(starts), 0, 7 ^ SALT_PACK_GROUPS)
    for epoch in (0, 1):
        for group in range(packing.num_groups):
            docs = deal[group * group_docs:(group + 1) * group_docs]
            order = perm(len(docs), epoch * packing.num_groups + group, 7 ^ SALT_PACK_ORDER)
            want = oracle_pack(lengths, [int(p) for p in starts], docs, order, T + 1, remainder)
            assert packing._pack(group, epoch) == want, (epoch, group)
            assert len(want) == packing.group_rows[group]  # the same number of rows every epoch


def document_of(starts, position):
    return int(np.searchsorted(starts, position, side="right")) - 1


@pytest.mark.parametrize("remainder", [False, True])
def test_rows_start_with_bos_and_pieces_stay_in_their_document(remainder):
    T = 32
    tokens, starts = documents(300, T=T)
    packing = BestFitPacking(starts, tokens.size, T, seed=1, group_docs=40, remainder=remainder)
    ends = np.append(starts[1:], tokens.size)
    G = 4
    for step in range(packing.epoch_rows // G + 3):  # past the end of an epoch
        for g in range(G):
            pieces = packing.row(step, g, G)
            row = packing.materialize(pieces, tokens, BOS)
            assert len(row) == T + 1 and row[0] == BOS
            for piece in pieces:
                first = piece.start
                last = piece.start + piece.length - (2 if piece.bos else 1)  # the last stream token it reads
                d = document_of(starts, first)
                assert last < ends[d], piece  # never across a document's end
                assert piece.bos or first == starts[d], piece  # a document piece starts at its BOS
                assert not piece.bos or first > starts[d], piece  # a tail starts inside its document


@pytest.mark.parametrize("remainder", [False, True])
def test_every_document_once_per_epoch(remainder):
    T = 32
    tokens, starts = documents(400, T=T)
    packing = BestFitPacking(starts, tokens.size, T, seed=2, group_docs=64, remainder=remainder)
    G = 8
    whole = {}  # document -> times it opened a piece (its BOS) in the epoch
    emitted = np.zeros(tokens.size, dtype=np.int64)  # how often each stream token went into a row
    rows = packing.epoch_rows // G * G
    for w in range(rows):
        for piece in packing.row(w // G, w % G, G):
            if not piece.bos:
                whole[piece.start] = whole.get(piece.start, 0) + 1
            skip = 1 if piece.bos else 0
            emitted[piece.start:piece.start + piece.length - skip] += 1
    assert max(emitted) == 1  # no stream token twice in an epoch
    # Every document opens exactly one piece, but those dealt into rows dropped at the end of a group or of
    # the epoch's last partial global batch.
    assert set(whole.values()) == {1} and len(whole) >= 0.9 * len(starts)
    stats = packing_stats(packing)
    if remainder:  # nothing cropped: what is not emitted lies in the rows dropped at the groups' ends
        assert stats["cropped_fraction"] < 0.05
        dropped = stats["document_tokens"] - stats["placed"]
        assert dropped <= packing.num_groups * (T + 1)
    else:
        lengths = np.diff(np.append(starts, tokens.size))
        floor = np.maximum(lengths - (T + 1), 0).sum() / lengths.sum()  # tokens no row of T+1 can hold
        assert stats["cropped_fraction"] >= floor


def test_rows_are_a_function_of_seed_step_and_global_row():
    tokens, starts = documents(200)
    a = BestFitPacking(starts, tokens.size, 32, seed=5, group_docs=30)
    b = BestFitPacking(starts, tokens.size, 32, seed=5, group_docs=30)
    c = BestFitPacking(starts, tokens.size, 32, seed=6, group_docs=30)
    # The same global row w = step*G + g on any world size: G = 8 as 1 rank of 8 or 4 of 2 rows.
    for w in range(0, 3 * a.epoch_rows, 37):
        assert a.row(w // 8, w % 8, 8) == b.row(w // 2, w % 2, 2)
    assert any(a.row(s, 0, 8) != c.row(s, 0, 8) for s in range(10))
    # Epochs reorder the groups and rows: not the same rows in the same order.
    assert [a.row(s, 0, 1) for s in range(20)] != [a.row(a.epoch_rows + s, 0, 1) for s in range(20)]


def test_refusals():
    with pytest.raises(ValueError, match="holds no BOS"):
        BestFitPacking([], 100, 8)
    with pytest.raises(ValueError, match="no group of 1 documents fills a row"):
        BestFitPacking([0, 3], 6, 8, group_docs=1)
