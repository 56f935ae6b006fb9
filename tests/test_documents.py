"""Document starts, BOS-aligned window starts and doc info vs plain-Python oracles; Triton vs the reference."""

import random

import numpy as np
import pytest
import torch

from gpuload import native
from gpuload.documents import (DEFAULT_CHUNK_TOKENS, SALT_ALIGNED_RANDOM, AlignedChunking,
                               aligned_window_starts, aligned_window_starts_and_visits, doc_info_reference,
                               document_starts, max_segments_per_row, usable_document_starts)
from gpuload.kernels import triton_docs
from gpuload.kernels.triton_docs import doc_info_triton
from gpuload.sampling import MASK64, SALT_CHUNKS, SALT_RANDOM, SAMPLING_IDS, Chunking, mix64_int
from test_sampling import oracle_feistel  # (the scalar Feistel oracle written from the docstring)

if triton_docs.interpreter_active():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

needs_triton = pytest.mark.skipif(
    DEVICE is None,
    reason="no CUDA device, and the Triton interpreter is off (TRITON_INTERPRET was not 1 when "
           "gpuload.kernels.triton_docs was imported): set TRITON_INTERPRET=1 in the environment")

BOS = 7


# --- synthetic documents and plain-Python oracles ------------------------------------------------

def make_stream(doc_lengths, bos=BOS, vocab=50, seed=0, lead=0):
    """Documents [bos, body...] of the given lengths (>= 1), bodies free of bos; `lead` tokens before the first."""
    rng = random.Random(seed)
    body = [t for t in range(vocab) if t != bos]
    tokens = [rng.choice(body) for _ in range(lead)]
    for length in doc_lengths:
        tokens.append(bos)
        tokens.extend(rng.choice(body) for _ in range(length - 1))
    return tokens


def random_doc_lengths(rng, count, seq_len, batch):
    """A mix of lengths: single-token documents (consecutive bos), short, longer than T, longer than B*T."""
    choices = [lambda: 1, lambda: rng.randint(2, 6), lambda: rng.randint(2, max(2, seq_len)),
               lambda: rng.randint(seq_len + 1, 3 * seq_len),
               lambda: rng.randint(batch * seq_len + 1, 2 * batch * seq_len)]
    weights = [3, 5, 5, 2, 1]
    return [rng.choices(choices, weights)[0]() for _ in range(count)]


def oracle_doc_info(rows, bos):
    """position_ids, cu_seqlens, max_seqlen of a batch given as lists of token lists, by plain loops."""
    positions, cu, longest, flat = [], [], 0, 0
    for row in rows:
        pos = []
        for t, token in enumerate(row):
            if t == 0 or token == bos:
                cu.append(flat + t)
                pos.append(0)
            else:
                pos.append(pos[-1] + 1)
            longest = max(longest, pos[-1] + 1)
        positions.append(pos)
        flat += len(row)
    cu.append(flat)
    return positions, cu, longest


def windows(stream, starts, seq_len):
    return [stream[o:o + seq_len] for o in starts]


def check_doc_info(x, bos, want, capacity=None, block_size=None):
    """Reference and Triton kernel against the oracle, exact and (if given) fixed-capacity forms."""
    positions, cu, longest = want
    num_segments = len(cu) - 1
    total = x.numel()
    ref = doc_info_reference(x, bos, capacity)
    got = doc_info_triton(x.to(DEVICE), bos, capacity, block_size=block_size) if DEVICE else None
    want_pos = torch.tensor(positions, dtype=torch.int64)
    if capacity is None:
        want_cu = torch.tensor(cu, dtype=torch.int32)
    else:
        want_cu = torch.tensor((cu[:-1] + [total] * (capacity + 1))[:capacity] + [total], dtype=torch.int32)
    for info in filter(None, [ref, got]):
        assert torch.equal(info.position_ids.cpu(), want_pos)
        assert torch.equal(info.cu_seqlens.cpu(), want_cu)
        assert info.cu_seqlens.is_contiguous()
        if capacity is None:
            assert type(info.max_seqlen) is int and info.max_seqlen == longest
            assert type(info.num_segments) is int and info.num_segments == num_segments
        else:
            assert torch.equal(info.max_seqlen.cpu(), torch.tensor(longest, dtype=torch.int32))
            assert torch.equal(info.num_segments.cpu(), torch.tensor(num_segments, dtype=torch.int32))
    return ref, got


# --- document_starts ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,bos", [(torch.uint16, 7), (torch.uint16, 65535), (torch.uint16, 40000),
                                       (torch.uint32, 2**32 - 1), (torch.uint32, 2**31 + 3), (torch.int64, 5)])
@pytest.mark.parametrize("chunk_tokens", [1, 7, 64, DEFAULT_CHUNK_TOKENS])
def test_document_starts_equal_python(dtype, bos, chunk_tokens):
    rng = random.Random(bos + chunk_tokens)
    high = 1 << (16 if dtype == torch.uint16 else 32)
    values = [rng.choice([bos, rng.randrange(high)]) if rng.random() < 0.2 else rng.randrange(high)
              for _ in range(1000)]
    values[0], values[-1] = bos, bos  # both ends of the stream (and of chunks when chunk_tokens divides 1000)
    tokens = torch.tensor(values, dtype=torch.int64).to(dtype)
    want = torch.tensor([i for i, v in enumerate(values) if v == bos], dtype=torch.int64)
    got = document_starts(tokens, bos, chunk_tokens=chunk_tokens)
    assert got.dtype == torch.int64 and torch.equal(got, want)
    if dtype != torch.int64:
        # A signed view (the loader's int16/int32 tensors) holds the same ids.
        signed = torch.int16 if dtype == torch.uint16 else torch.int32
        assert torch.equal(document_starts(tokens.view(signed), bos, chunk_tokens=chunk_tokens), want)


def test_document_starts_over_shards_numpy_memmaps_and_strided_tensors(tmp_path):
    rng = np.random.default_rng(0)
    stream = rng.integers(0, 20, size=3001).astype(np.uint16)
    want = torch.from_numpy(np.flatnonzero(stream == 3).astype(np.int64))
    pieces = [stream[:5], stream[5:1700], stream[1700:1701], stream[1701:]]  # shard sizes 5, 1695, 1, 1300
    path = tmp_path / "tokens.u16"
    stream.tofile(path)
    memmap = np.memmap(path, dtype=np.uint16, mode="r")
    assert torch.equal(document_starts(pieces, 3, chunk_tokens=64), want)
    assert torch.equal(document_starts([torch.from_numpy(p.copy()) for p in pieces], 3, chunk_tokens=100), want)
    assert torch.equal(document_starts(memmap, 3, chunk_tokens=999), want)
    assert torch.equal(document_starts((memmap[:10], memmap[10:]), 3), want)
    every_other = torch.from_numpy(stream.astype(np.int32))[::2]
    assert torch.equal(document_starts(every_other, 3, chunk_tokens=33),
                       torch.from_numpy(np.flatnonzero(stream[::2] == 3).astype(np.int64)))


def test_document_starts_without_any_bos_is_empty():
    got = document_starts(torch.zeros(100, dtype=torch.uint16), 5, chunk_tokens=16)
    assert got.dtype == torch.int64 and got.numel() == 0


@pytest.mark.parametrize("tokens,bos,match", [
    (torch.zeros(10, dtype=torch.uint16), 65536, r"bos_token must be in \[0, 2\*\*16\)"),
    (torch.zeros(10, dtype=torch.uint32), -1, r"bos_token must be in \[0, 2\*\*32\)"),
    (torch.zeros(10, dtype=torch.uint16), True, "bos_token must be an integer"),
    (torch.zeros(10, dtype=torch.uint16), 3.0, "bos_token must be an integer"),
    (torch.zeros(10, dtype=torch.float32), 3, "1-D uint16/uint32"),
    (torch.zeros(2, 5, dtype=torch.uint16), 3, "1-D uint16/uint32"),
    (np.zeros(10, dtype=np.float64), 3, "1-D uint16/uint32"),
    ("tokens", 3, "found str"),
    ([], 3, "empty sequence"),
])
def test_document_starts_rejects_bad_input(tokens, bos, match):
    with pytest.raises(ValueError, match=match):
        document_starts(tokens, bos)


def test_document_starts_rejects_bad_chunk_size():
    with pytest.raises(ValueError, match="chunk_tokens must be a positive int"):
        document_starts(torch.zeros(4, dtype=torch.uint16), 1, chunk_tokens=0)


# --- BOS-aligned window starts ---------------------------------------------------------------------

def oracle_aligned(mode, seed, step, g, G, starts):
    if mode == "random":
        h = mix64_int(mix64_int(mix64_int(seed ^ SALT_ALIGNED_RANDOM) + step) + g)
        return starts[(h >> 1) % len(starts)]
    w = step * G + g
    return starts[oracle_feistel(w % len(starts), w // len(starts), seed & MASK64, len(starts))]


def aligned_fixture(seq_len=16, num_docs=60, seed=0):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 3, rng.randint(4, 3 * seq_len)]) for _ in range(num_docs)]
    stream = make_stream(lengths, lead=5, seed=seed)
    tokens = torch.tensor(stream, dtype=torch.uint16)
    usable = usable_document_starts(document_starts(tokens, BOS), len(stream), seq_len)
    return stream, tokens, usable


@pytest.mark.parametrize("mode", ["random", "shuffle"])
@pytest.mark.parametrize("seed", [0, 123, 2**64 - 1, -5])
def test_aligned_starts_equal_oracle_and_rows_start_with_bos(mode, seed):
    seq_len, G = 16, 12
    stream, _, usable = aligned_fixture(seq_len)
    starts_list = usable.tolist()
    for step in (0, 1, 7, 2**40 + 3):
        got = aligned_window_starts(mode, seed, step, torch.arange(G), G, usable, len(stream))
        assert got.tolist() == [oracle_aligned(mode, seed, step, g, G, starts_list) for g in range(G)]
        for o in got.tolist():
            assert stream[o] == BOS and o + seq_len + 1 <= len(stream)


def test_usable_starts_leave_room_for_a_whole_window():
    seq_len = 16
    stream, tokens, usable = aligned_fixture(seq_len)
    all_starts = document_starts(tokens, BOS).tolist()
    assert usable.tolist() == [p for p in all_starts if p + seq_len + 1 <= len(stream)]
    assert len(usable) < len(all_starts) or all_starts[-1] + seq_len + 1 <= len(stream)
    # A start exactly at N - T - 1 is usable, one at N - T is not.
    n = 40
    starts = torch.tensor([3, n - seq_len - 1, n - seq_len])
    assert usable_document_starts(starts, n, seq_len).tolist() == [3, n - seq_len - 1]


@pytest.mark.parametrize("starts,match", [(torch.tensor([30, 35]), "found document starts: 2, the first at "
                                                                    "position 30"),
                                          (torch.zeros(0, dtype=torch.int64), "none in the stream")])
def test_no_usable_start_is_an_error(starts, match):
    with pytest.raises(ValueError, match=match):
        usable_document_starts(starts, 40, 16)


@pytest.mark.parametrize("global_batch", [1, 7, 13, 40])
def test_aligned_shuffle_takes_every_start_once_per_epoch(global_batch):
    _, _, usable = aligned_fixture(num_docs=30, seed=3)
    d = usable.numel()
    seen, epochs = [], []
    for step in range(3 * d // global_batch + 2):
        seen += aligned_window_starts("shuffle", 9, step, torch.arange(global_batch), global_batch, usable,
                                      10**6).tolist()
    for e in range(len(seen) // d):
        epoch = seen[e * d:(e + 1) * d]
        assert sorted(epoch) == usable.tolist()
        epochs.append(epoch)
    assert epochs[0] != epochs[1]  # a new order each epoch


def test_aligned_random_is_uniform_over_starts_and_differs_from_plain_random():
    starts = torch.arange(0, 50 * 3, 3)  # 50 usable starts
    draws = torch.cat([aligned_window_starts("random", 1, s, torch.arange(100), 100, starts, 10**6)
                       for s in range(200)])
    hist = torch.bincount(draws // 3, minlength=50)
    # 20,000 draws over 50 starts: 400 each expected, sd 20; 6 sd bounds.
    assert int(hist.min()) > 280 and int(hist.max()) < 520
    # A new salt: the aligned index is not the plain-random hash taken modulo D.
    plain = [(mix64_int(mix64_int(mix64_int(1 ^ SALT_RANDOM) + 0) + g) >> 1) % 50 * 3 for g in range(100)]
    assert draws[:100].tolist() != plain


def test_aligned_starts_do_not_depend_on_world_size():
    _, _, usable = aligned_fixture()
    for mode in ("random", "shuffle"):
        whole = aligned_window_starts(mode, 4, 5, torch.arange(8), 8, usable, 10**6)
        for rank in range(4):
            rows = torch.arange(rank * 2, rank * 2 + 2)
            assert torch.equal(aligned_window_starts(mode, 4, 5, rows, 8, usable, 10**6), whole[rows])


def test_aligned_rejects_bad_modes_and_starts():
    starts = torch.tensor([0, 5])
    with pytest.raises(ValueError, match="works with sampling in"):
        aligned_window_starts("llmc", 0, 0, torch.arange(2), 2, starts, 100)
    _, usable, _, chunks = chunked_fixture(global_batch=6, windows_per_chunk=15)
    with pytest.raises(ValueError, match="sequential rows follow the whole stream"):
        aligned_window_starts("sequential", 0, 0, torch.arange(2), 6, usable, chunks.chunking.num_tokens, chunks)
    # Sequential rows index their table in order, epoch after epoch.
    assert aligned_window_starts("sequential", 9, 1, torch.arange(2), 2, starts, 100).tolist() == [0, 5]
    with pytest.raises(ValueError, match="non-empty 1-D int64"):
        aligned_window_starts("random", 0, 0, torch.arange(2), 2, torch.zeros(0, dtype=torch.int64), 100)
    with pytest.raises(ValueError, match="step must be"):
        aligned_window_starts("random", 0, -1, torch.arange(2), 2, starts, 100)


# --- BOS-aligned starts on a ring smaller than the stream (AlignedChunking) -------------------------

def oracle_chunked_aligned(mode, seed, step, g, G, starts, chunking):
    """(start, visit) of global row g by the chunked aligned rule, written from documents.py's docstring."""
    C, K = chunking.chunk_tokens, chunking.num_chunks
    owned = [[p for p in starts if min(p // C, K - 1) == j] for j in range(K)]
    visited = [j for j in range(K) if owned[j]]
    w = step * G + g
    epoch, i = divmod(w, len(starts))
    order = [visited[oracle_feistel(q, epoch, (seed ^ SALT_CHUNKS) & MASK64, len(visited))] for q in range(len(visited))]
    before = 0
    for q, j in enumerate(order):
        if i < before + len(owned[j]):
            break
        before += len(owned[j])
    visit = epoch * len(visited) + q
    if mode == "random":
        h = mix64_int(mix64_int(mix64_int(seed ^ SALT_ALIGNED_RANDOM) + step) + g)
        return owned[j][(h >> 1) % len(owned[j])], visit
    return owned[j][oracle_feistel(i - before, visit, seed & MASK64, len(owned[j]))], visit


def chunked_fixture(seq_len=8, global_batch=4, windows_per_chunk=12, seed=0, num_docs=120):
    """Documents of random lengths over a few dozen chunks: mostly short ones (down to a single token), some
    of one to three chunks, so chunks hold many, few, one or no document starts."""
    rng = random.Random(seed)
    C = windows_per_chunk * seq_len
    pick = [lambda: 1, lambda: 2, lambda: rng.randint(3, 2 * seq_len), lambda: rng.randint(C, 3 * C)]
    lengths = [rng.choices(pick, [2, 2, 8, 1])[0]() for _ in range(num_docs)]
    stream = make_stream(lengths, lead=3, seed=seed)
    usable = usable_document_starts(document_starts(torch.tensor(stream, dtype=torch.uint16), BOS), len(stream),
                                    seq_len)
    chunking = Chunking(len(stream), seq_len, global_batch, windows_per_chunk)
    return stream, usable, chunking, AlignedChunking(chunking, usable, 4)


@pytest.mark.parametrize("mode", ["random", "shuffle"])
@pytest.mark.parametrize("seed", [0, 2**64 - 1, -5])
def test_chunked_aligned_starts_equal_oracle(mode, seed):
    stream, usable, chunking, chunks = chunked_fixture()
    assert 0 in chunks.counts and 1 in chunks.counts and len(chunks.nonempty) > 2  # empty chunks are skipped
    G, starts_list = chunking.global_batch, usable.tolist()
    for step in (0, 1, 5, len(starts_list) // G, 2**40 + 3):
        got, visits = aligned_window_starts_and_visits(mode, seed, step, torch.arange(G), G, usable, len(stream),
                                                       chunks)
        want = [oracle_chunked_aligned(mode, seed, step, g, G, starts_list, chunking) for g in range(G)]
        assert list(zip(got.tolist(), visits.tolist())) == want
        assert (visits.min().item(), visits.max().item()) == chunks.step_visits(seed, step)


@pytest.mark.parametrize("mode", ["random", "shuffle"])
@pytest.mark.parametrize("global_batch,windows_per_chunk,seed", [(1, 5, 0), (4, 12, 0), (7, 30, 3)])
def test_chunked_aligned_rows_read_their_visits_chunk_and_each_pass_serves_every_chunk_its_count(
        mode, global_batch, windows_per_chunk, seed):
    stream, usable, chunking, chunks = chunked_fixture(8, global_batch, windows_per_chunk, seed)
    D, T = usable.numel(), chunking.seq_len
    seen, visits = [], []
    for step in range(-(-3 * D // global_batch)):
        starts, v = aligned_window_starts_and_visits(mode, 11, step, torch.arange(global_batch), global_batch,
                                                     usable, len(stream), chunks)
        seen += starts.tolist()
        visits += v.tolist()
    for o, v in zip(seen, visits):  # every window lies whole in what its visit loads, and starts a document
        first, count = chunks.span(chunks.visit_chunk(11, v))
        assert stream[o] == BOS and first <= o and o + T + 1 <= first + count
    for p in range(3):
        rows = seen[p * D:(p + 1) * D]
        if mode == "shuffle":  # every usable start exactly once per pass
            assert sorted(rows) == usable.tolist()
        else:  # each chunk serves exactly its D_j rows per pass, drawn among its own starts
            per_chunk = np.bincount([min(o // chunking.chunk_tokens, chunking.num_chunks - 1) for o in rows],
                                    minlength=chunking.num_chunks)
            assert per_chunk.tolist() == chunks.counts
    assert seen[:D] != seen[D:2 * D]  # a new order each pass


def test_chunked_aligned_with_one_visited_chunk_is_the_whole_stream_rule():
    # Every document start in the first chunk: K_E = 1, so both rules reduce to the whole-stream ones.
    stream = make_stream([3, 5, 1, 9, 2, 4, 40, 400], lead=2)
    usable = usable_document_starts(document_starts(torch.tensor(stream, dtype=torch.uint16), BOS), len(stream), 8)
    chunks = AlignedChunking(Chunking(len(stream), 8, 4, 10), usable, 4)
    assert len(chunks.nonempty) == 1
    for mode in ("random", "shuffle"):
        for step in range(7):
            chunked, visits = aligned_window_starts_and_visits(mode, 2, step, torch.arange(4), 4, usable, len(stream),
                                                               chunks)
            assert torch.equal(chunked, aligned_window_starts(mode, 2, step, torch.arange(4), 4, usable, len(stream)))
            assert visits.tolist() == [(step * 4 + g) // usable.numel() for g in range(4)]


def test_chunked_aligned_starts_do_not_depend_on_world_size():
    stream, usable, chunking, chunks = chunked_fixture(global_batch=8, windows_per_chunk=20, seed=3)
    for mode in ("random", "shuffle"):
        whole = aligned_window_starts(mode, 4, 5, torch.arange(8), 8, usable, len(stream), chunks)
        for rank in range(4):
            rows = torch.arange(rank * 2, rank * 2 + 2)
            assert torch.equal(aligned_window_starts(mode, 4, 5, rows, 8, usable, len(stream), chunks), whole[rows])


def test_aligned_chunking_refuses_steps_that_could_outgrow_the_ring():
    # Chunks of 10 windows of 8 tokens, one start each: a step of 10 rows could span 10 chunks.
    stream = make_stream([80] * 10)
    usable = usable_document_starts(document_starts(torch.tensor(stream, dtype=torch.uint16), BOS), len(stream), 8)
    with pytest.raises(ValueError, match=r"chunk\(s\) \[.*\] of 80 tokens hold only \[1, 1.*could read 10 chunks, "
                                         r"more than the ring's 4 slots"):
        AlignedChunking(Chunking(len(stream), 8, 10, 10), usable, 4)
    with pytest.raises(ValueError, match="at least one global batch of usable document starts, found 10"):
        AlignedChunking(Chunking(len(stream), 8, 11, 11), usable, 4)
    chunks = AlignedChunking(Chunking(len(stream), 8, 4, 10), usable, 4)  # 4 rows: at most 4 chunks per step
    with pytest.raises(ValueError, match="built for global batch 4"):
        aligned_window_starts("random", 0, 0, torch.arange(2), 2, usable, len(stream), chunks)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
@pytest.mark.parametrize("mode", ["random", "shuffle"])
@pytest.mark.parametrize("chunked", [False, True])
def test_native_aligned_starts_equal_torch(mode, chunked):
    stream, usable, chunking, chunks = chunked_fixture(global_batch=6, windows_per_chunk=15)
    G, D = 6, usable.numel()
    out = np.empty(G, dtype=np.int64)
    for seed in (0, 2**64 - 1):
        for step in list(range(0, 3 * D // G + 2)) + [2**40 + 1]:  # across pass boundaries, and far
            rows = np.arange(G, dtype=np.int64)
            table, pass0, pos0 = None, 0, 0
            if chunked:
                pass0, pos0, table = chunks.step_table(seed, step)
                table = table.numpy()
            native.module().aligned_starts(SAMPLING_IDS[mode], seed, step, rows, G, usable.numpy(), table, pass0,
                                           pos0, chunks.num_visited, out)
            want = aligned_window_starts(mode, seed, step, torch.from_numpy(rows), G, usable, len(stream),
                                         chunks if chunked else None)
            assert out.tolist() == want.tolist(), (seed, step)


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_aligned_starts_check_their_arguments():
    _, usable, _, chunks = chunked_fixture(global_batch=6, windows_per_chunk=15)
    mod, starts, out = native.module(), usable.numpy(), np.empty(2, dtype=np.int64)
    rows = np.arange(2, dtype=np.int64)
    table = chunks.pass_table(0, 0).numpy()
    with pytest.raises(ValueError, match="mode must be 0"):
        mod.aligned_starts(3, 0, 0, rows, 6, starts, None, 0, 0, 0, out)
    with pytest.raises(ValueError, match="sequential rows over a table have no chunked rule"):
        mod.aligned_starts(2, 0, 0, rows, 6, starts, table, 0, 0, chunks.num_visited, out)
    with pytest.raises(IndexError, match="row 7 outside the global batch"):
        mod.aligned_starts(0, 0, 0, np.array([0, 7], dtype=np.int64), 6, starts, None, 0, 0, 0, out)
    with pytest.raises(ValueError, match="does not cover this step"):
        mod.aligned_starts(0, 0, 10 * usable.numel(), rows, 6, starts, table, 0, 0, chunks.num_visited, out)
    with pytest.raises(ValueError, match="pass_table"):
        mod.aligned_starts(0, 0, 0, rows, 6, starts, table[:3], 0, 0, chunks.num_visited, out)


@pytest.mark.parametrize("seq_len", [1, 2, 5, 16, 40])
def test_max_segments_per_row_is_the_brute_force_maximum(seq_len):
    stream, tokens, _ = aligned_fixture(16, num_docs=40, seed=seq_len)
    doc_starts = document_starts(tokens, BOS)
    padded = stream + [BOS + 1] * seq_len  # rows that run past the end count too: the bound ignores N

    def most_segments(last_row_start):
        return max(1 + sum(1 for t in padded[o + 1:o + seq_len] if t == BOS) for o in range(last_row_start + 1))

    assert max_segments_per_row(doc_starts, seq_len) == most_segments(len(stream) - 1)
    assert max_segments_per_row(doc_starts, seq_len) >= most_segments(len(stream) - seq_len)
    assert max_segments_per_row(torch.zeros(0, dtype=torch.int64), seq_len) == 1


# --- doc info: reference and Triton kernel vs the oracle ------------------------------------------

@pytest.mark.parametrize("batch,seq_len,seed", [(1, 1, 0), (1, 5, 1), (3, 17, 2), (4, 64, 3), (8, 256, 4),
                                                (2, 200, 5)])
def test_doc_info_random_documents(batch, seq_len, seed):
    rng = random.Random(seed)
    stream = make_stream(random_doc_lengths(rng, 60, seq_len, batch), lead=3, seed=seed)
    starts = [rng.randrange(len(stream) - seq_len) for _ in range(batch)]
    rows = windows(stream, starts, seq_len)
    x = torch.tensor(rows, dtype=torch.int64)
    want = oracle_doc_info(rows, BOS)
    check_doc_info(x, BOS, want)
    check_doc_info(x, BOS, want, capacity=batch * seq_len)


@pytest.mark.parametrize("seq_len,block_size", [(37, 16), (64, 16), (33, 32), (100, 64)])
def test_doc_info_several_column_blocks_per_row(seq_len, block_size):
    # Segments cross block boundaries: the running segment start carries from one block to the next.
    rng = random.Random(seq_len)
    batch = 3
    stream = make_stream(random_doc_lengths(rng, 40, seq_len, batch), seed=seq_len)
    rows = windows(stream, [rng.randrange(len(stream) - seq_len) for _ in range(batch)], seq_len)
    x = torch.tensor(rows, dtype=torch.int64)
    check_doc_info(x, BOS, oracle_doc_info(rows, BOS), block_size=block_size)
    check_doc_info(x, BOS, oracle_doc_info(rows, BOS), capacity=batch * seq_len, block_size=block_size)


def test_doc_info_edge_rows():
    rows = [
        [BOS] + [1] * 11,                     # bos at column 0: one segment, not an empty one first
        [1] * 12,                             # no bos at all
        [BOS] * 12,                           # consecutive bos: twelve 1-token documents
        [1, 2, BOS, BOS, 3, 4, BOS, 5, 6, 7, 8, BOS],  # bos in the last column
        [2] * 11 + [BOS],
    ]
    assert all(len(row) == 12 for row in rows)
    want = oracle_doc_info(rows, BOS)
    assert want[1][:3] == [0, 12, 24] and want[2] == 12
    x = torch.tensor(rows, dtype=torch.int64)
    check_doc_info(x, BOS, want)
    check_doc_info(x, BOS, want, capacity=60)
    check_doc_info(x, BOS, want, block_size=16)


def test_doc_info_one_document_longer_than_the_batch():
    # No bos anywhere in the batch: every row is one segment of T tokens.
    batch, seq_len = 4, 50
    stream = make_stream([batch * seq_len * 3], seed=1)
    rows = windows(stream, [10, 60, 110, 300], seq_len)
    want = oracle_doc_info(rows, BOS)
    assert want[1] == [0, 50, 100, 150, 200] and want[2] == seq_len
    check_doc_info(torch.tensor(rows), BOS, want)


def test_doc_info_aligned_batch_rows_start_with_bos():
    # The loader's align="bos" case: every row begins a document, so column 0 is a bos.
    seq_len, batch = 32, 6
    stream, _, usable = aligned_fixture(seq_len, seed=8)
    starts = aligned_window_starts("random", 2, 3, torch.arange(batch), batch, usable, len(stream))
    rows = windows(stream, starts.tolist(), seq_len)
    assert all(row[0] == BOS for row in rows)
    check_doc_info(torch.tensor(rows), BOS, oracle_doc_info(rows, BOS), capacity=batch * seq_len)


@pytest.mark.parametrize("bos", [5, 2**31 + 5, 2**32 - 1])
def test_doc_info_int32_batches_hold_uint32_ids(bos):
    # x as int32 (input_dtype=torch.int32) holds uint32 ids as the same bits, large bos ids included.
    rows = [[1, bos, 2, 3, bos, bos, 4], [bos, 9, 9, 9, 9, 9, 9]]
    x = torch.tensor(rows, dtype=torch.int64).to(torch.uint32).view(torch.int32)
    check_doc_info(x, bos, oracle_doc_info(rows, bos))


@needs_triton
def test_doc_info_row_offsets_summed_over_several_row_blocks(monkeypatch):
    # A row's cu_seqlens offset sums the counts above it ROW_BLOCK at a time; force several blocks.
    monkeypatch.setattr(triton_docs, "_MAX_ROW_BLOCK", 2)
    rng = random.Random(11)
    batch, seq_len = 7, 9
    stream = make_stream(random_doc_lengths(rng, 50, seq_len, batch), seed=11)
    rows = windows(stream, [rng.randrange(len(stream) - seq_len) for _ in range(batch)], seq_len)
    check_doc_info(torch.tensor(rows), BOS, oracle_doc_info(rows, BOS))


def test_doc_info_capacity_bound_and_overflow():
    seq_len, batch = 16, 4
    stream, tokens, _ = aligned_fixture(seq_len, seed=5)
    doc_starts = document_starts(tokens, BOS)
    rng = random.Random(5)
    rows = windows(stream, [rng.randrange(len(stream) - seq_len) for _ in range(batch)], seq_len)
    want = oracle_doc_info(rows, BOS)
    # The data-derived bound always holds the batch's segments.
    capacity = batch * max_segments_per_row(doc_starts, seq_len)
    assert len(want[1]) - 1 <= capacity
    check_doc_info(torch.tensor(rows), BOS, want, capacity=capacity)
    # Too small a capacity: later starts are dropped, the true count still comes back.
    small = max(batch, len(want[1]) - 3)
    ref, got = check_doc_info(torch.tensor(rows), BOS, want, capacity=small)
    assert int(ref.num_segments) > small


def test_doc_info_max_seqlen_is_largest_position_plus_one():
    rng = random.Random(12)
    stream = make_stream(random_doc_lengths(rng, 30, 20, 5), seed=12)
    x = torch.tensor(windows(stream, [rng.randrange(len(stream) - 20) for _ in range(5)], 20))
    info = doc_info_reference(x, BOS)
    lengths = (info.cu_seqlens[1:] - info.cu_seqlens[:-1]).tolist()
    assert min(lengths) >= 1 and max(lengths) == info.max_seqlen == int(info.position_ids.max()) + 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(2, 3, dtype=torch.float32)), "x must be a \\(B, T\\) int64 or int32"),
    (dict(x=torch.zeros(6, dtype=torch.int64)), "x must be a \\(B, T\\)"),
    (dict(x=torch.zeros(0, 3, dtype=torch.int64)), "B >= 1"),
    (dict(bos_token=-1), "bos_token must be in"),
    (dict(bos_token=2**32, x=torch.zeros(2, 3, dtype=torch.int32)), r"\[0, 2\*\*32\)"),
    (dict(capacity=1), r"capacity must be an int in \[B, B\*T\] = \[2, 6\]"),
    (dict(capacity=7), "capacity must be"),
    (dict(capacity=3.0), "capacity must be"),
])
def test_doc_info_rejects_bad_arguments(kwargs, match):
    args = dict(x=torch.zeros(2, 3, dtype=torch.int64), bos_token=1, capacity=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        doc_info_reference(**args)
    if DEVICE is not None:
        args["x"] = args["x"].to(DEVICE)
        with pytest.raises(ValueError, match=match):
            doc_info_triton(**args)


@needs_triton
def test_doc_info_triton_rejects_strided_x_and_bad_block():
    x = torch.zeros(4, 6, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        doc_info_triton(x.t(), 1)
    with pytest.raises(ValueError, match="power of two"):
        doc_info_triton(x, 1, block_size=24)


def test_doc_info_triton_on_cpu_without_interpreter_says_how_to_fix(monkeypatch):
    monkeypatch.setattr(triton_docs, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        doc_info_triton(torch.zeros(2, 3, dtype=torch.int64), 1)
