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


# --- pack="bestfit" in the loader: every backend, held to the rule above.

from gpuload import GPULoader, native  # noqa: E402
from gpuload.kernels import triton_gather  # noqa: E402
from gpuload.shards import write_shard  # noqa: E402

BACKENDS = ["torch"] + (["native"] if native.available() else []) + \
    (["triton"] if triton_gather.interpreter_active() or torch.cuda.is_available() else [])


def packed_shards(tmp_path, num_docs=600, T=32):
    tokens, starts = documents(num_docs, T=T)
    tokens = tokens.astype(np.uint16)
    paths = []
    for i, (a, b) in enumerate([(0, tokens.size // 3), (tokens.size // 3, tokens.size)]):
        paths.append(str(tmp_path / f"train_{i}.bin"))
        write_shard(paths[-1], tokens[a:b])
    return paths, tokens, starts


def packed_loader(paths, backend, **kw):
    on_gpu = backend == "triton" and not triton_gather.interpreter_active()
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    kw.setdefault("sampling", "shuffle")
    return GPULoader(paths, device="cuda" if on_gpu else "cpu", backend=backend, bos_token=BOS, pack="bestfit", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampling", ["shuffle", "random"])
@pytest.mark.parametrize("remainder", [False, True])
def test_loader_rows_are_the_packing_rule(tmp_path, backend, sampling, remainder):
    T, B = 32, 3
    paths, tokens, starts = packed_shards(tmp_path, T=T)
    ld = packed_loader(paths, backend, batch_size=B, seq_len=T, sampling=sampling, pack_remainder=remainder,
                       seed=11, doc_info=True)
    packing = BestFitPacking(starts, tokens.size, T, seed=11, remainder=remainder)
    for step in range(6 if backend == "triton" else 40):
        x, y, doc = next(ld)
        x, y = x.cpu(), y.cpu()
        for b in range(B):
            row = packing.materialize(packing.row(step, b, B, sampling == "random"), tokens, BOS)
            assert x[b].tolist() == row[:-1] and y[b].tolist() == row[1:], (step, b)
        assert bool((x[:, 0] == BOS).all())
        # Every piece starts with a BOS, so the doc info's segments are the pieces that start inside x.
        rows = [packing.row(step, b, B, sampling == "random") for b in range(B)]
        in_x = sum(sum(1 for k in range(len(row)) if sum(p.length for p in row[:k]) < T) for row in rows)
        assert int(doc.num_segments) == in_x


def test_loader_resume_and_elastic(tmp_path):
    T = 32
    paths, _, _ = packed_shards(tmp_path, T=T)
    ref = packed_loader(paths, "torch", batch_size=4, seq_len=T, pack_remainder=True)
    want = [next(ref)[0] for _ in range(30)]
    state = {**ref.state_dict(), "step": 9}
    assert state["pack"] == "bestfit-remainder"
    parts = [packed_loader(paths, "torch", batch_size=2, seq_len=T, pack_remainder=True, rank=r, world_size=2)
             for r in range(2)]
    for part in parts:
        part.load_state_dict(state)
    for step in range(9, 30):
        assert torch.equal(torch.cat([next(part)[0] for part in parts]), want[step])
    with pytest.raises(ValueError, match="pack differs"):
        packed_loader(paths, "torch", batch_size=4, seq_len=T).load_state_dict(state)
    reseeded = packed_loader(paths, "torch", batch_size=4, seq_len=T, pack_remainder=True, seed=5)
    reseeded.load_state_dict(state)  # the state's seed deals the groups again
    assert torch.equal(next(reseeded)[0], want[9])


def test_loader_refusals(tmp_path):
    paths, _, _ = packed_shards(tmp_path)
    base = dict(batch_size=2, seq_len=32, device="cpu", rank=0, world_size=1)
    cases = [
        (dict(pack="first-fit", bos_token=BOS), "pack must be None or 'bestfit'"),
        (dict(pack_remainder=True), "pass pack='bestfit'"),
        (dict(pack="bestfit"), "pass bos_token=ID"),
        (dict(pack="bestfit", bos_token=BOS, sampling="sequential"), "orders its rows by sampling='shuffle'"),
        (dict(pack="bestfit", bos_token=BOS, align="bos"), "drop align='bos'"),
        (dict(pack="bestfit", bos_token=BOS, loop=False, sampling="shuffle"), "needs sampling='sequential'|loop=True"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message):
            GPULoader(paths, **{**base, **kw})
    with pytest.raises(ValueError, match="packs one dataset so far"):
        GPULoader({"a": paths[:1], "b": paths[1:]}, weights={"a": 1, "b": 1}, pack="bestfit", bos_token=BOS, **base)
    with pytest.raises(ValueError, match="needs the whole stream in the ring"):
        GPULoader(paths, pack="bestfit", bos_token=BOS, ring_tokens=8192, backend="torch", **base)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
@pytest.mark.parametrize("remainder", [False, True])
def test_native_planner_equals_the_reference(remainder):
    tokens, starts = documents(500, T=32)
    ref = BestFitPacking(starts, tokens.size, 32, seed=3, group_docs=37, remainder=remainder)
    planner = native.module().BestFitPlanner(starts.astype(np.int64), tokens.size, 32, 3, 37, remainder)
    assert (planner.epoch_rows, planner.max_pieces, planner.group_rows) == (ref.epoch_rows, ref.max_pieces,
                                                                             ref.group_rows)
    for epoch in (0, 2):
        for group in range(ref.num_groups):
            want = [[(p.start, p.length, p.bos) for p in row] for row in ref._pack(group, epoch)]
            assert planner.pack(group, epoch) == want
    G = 5
    for random in (False, True):
        for step in list(range(0, 3 * ref.epoch_rows // G, 7)):
            got, want = np.empty((2, 33), np.int64), np.empty((2, 33), np.int64)
            planner.rows_positions(step, 3, G, random, got)
            ref.rows_positions(step, 3, G, random, want)
            assert np.array_equal(got, want), (random, step)


@pytest.mark.skipif(not (triton_gather.interpreter_active() or torch.cuda.is_available()), reason="no Triton target")
@pytest.mark.parametrize("token_dtype", [torch.uint16, torch.uint32])
@pytest.mark.parametrize("input_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("B,T", [(1, 1), (3, 7), (2, 130)])
def test_packed_kernel_equals_the_reference(token_dtype, input_dtype, B, T):
    from gpuload.kernels.gather import packed_gather_reference
    from gpuload.kernels.triton_packed import gather_packed_triton

    device = "cpu" if triton_gather.interpreter_active() else "cuda"
    gen = torch.Generator().manual_seed(B * T)
    high = 2**16 if token_dtype == torch.uint16 else 2**31  # uint32 tokens past 2**31 too, with int64 x
    tokens = torch.randint(0, high, (4 * T + 9,), generator=gen, dtype=torch.int64)
    if token_dtype == torch.uint32 and input_dtype == torch.int64:
        tokens[::5] = 2**32 - 1 - tokens[::5]
    tokens = tokens.to(token_dtype).to(device)
    positions = torch.randint(-1, tokens.numel(), (B, T + 1), generator=gen, dtype=torch.int64).to(device)
    want = packed_gather_reference(tokens, positions, 7, input_dtype)
    x = torch.empty(B, T, dtype=input_dtype, device=device)
    y = torch.empty(B, T, dtype=torch.int64, device=device)
    gather_packed_triton(tokens, positions, 7, x, y)
    assert torch.equal(x, want[0]) and torch.equal(y, want[1])
