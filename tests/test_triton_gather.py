"""Triton gather vs the plain-torch reference (window_starts + gather_reference), bit for bit."""

import importlib.util
import json
import os

import pytest
import torch

from gpuload.documents import (aligned_window_starts, aligned_window_starts_and_visits, document_starts,
                               usable_document_starts)
from gpuload.kernels import triton_gather
from gpuload.kernels.gather import gather_reference
from gpuload.kernels.triton_gather import gather_batch_triton
from gpuload.sampling import MASK64, Chunking, window_starts, window_starts_and_visits, windows_per_epoch

if triton_gather.interpreter_active():
    DEVICE = "cpu"
elif torch.cuda.is_available():
    DEVICE = "cuda"
else:
    DEVICE = None

pytestmark = pytest.mark.skipif(
    DEVICE is None,
    reason="no CUDA device, and the Triton interpreter is off (TRITON_INTERPRET was not 1 when "
           "gpuload.kernels.triton_gather was imported): set TRITON_INTERPRET=1 in the environment or in "
           "tests/conftest.py")

MODES = ["random", "shuffle", "sequential"]


def random_tokens(n, dtype, seed=0):
    """Tokens over the dtype's full range, so values >= 2**15 / 2**31 (the sign bit of a view) occur."""
    gen = torch.Generator().manual_seed(seed)
    high = 1 << (16 if dtype == torch.uint16 else 32)
    tokens = torch.randint(0, high, (n,), generator=gen, dtype=torch.int64)
    tokens[:4] = torch.tensor([high - 1, high // 2, high // 2 - 1, 0])
    return tokens.to(dtype)


def position_tokens(start, count):
    """uint32 tokens equal to their stream position mod 2**32: windows far into the stream are checkable."""
    return (torch.arange(start, start + count, dtype=torch.int64) & 0xFFFFFFFF).to(torch.uint32)


def reference(tokens, mode, seed, step, row0, batch, global_batch, num_tokens, seq_len, input_dtype=torch.int64,
              token_offset=0):
    starts = window_starts(mode, seed, step, torch.arange(row0, row0 + batch), global_batch, num_tokens, seq_len)
    shard_starts = torch.tensor([token_offset, token_offset + tokens.numel()])
    x, y = gather_reference([tokens], shard_starts, starts - token_offset, seq_len, input_dtype)
    return x, y, starts


def run(tokens, mode, seed, step, row0, batch, global_batch, num_tokens, seq_len, **kwargs):
    """The kernel on DEVICE, results back on the CPU; also returns the in-kernel window starts."""
    starts = torch.empty(batch, dtype=torch.int64, device=DEVICE)
    x, y = gather_batch_triton(tokens.to(DEVICE), mode, seed, step, row0, batch, global_batch, num_tokens,
                               seq_len, out_starts=starts, **kwargs)
    return x.cpu(), y.cpu(), starts.cpu()


def assert_batch_equal(got, want, input_dtype=torch.int64):
    x, y, starts = got
    rx, ry, rstarts = want
    assert torch.equal(starts, rstarts), (starts, rstarts)
    assert x.dtype == input_dtype and y.dtype == torch.int64
    assert x.is_contiguous() and y.is_contiguous()
    assert torch.equal(x, rx)
    assert torch.equal(y, ry)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("token_dtype", [torch.uint16, torch.uint32])
@pytest.mark.parametrize("input_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("batch,seq_len", [(1, 1), (5, 7), (3, 129)])
def test_matches_reference(mode, token_dtype, input_dtype, batch, seq_len):
    num_tokens, row0, global_batch, seed, step = 3001, 2, 11, 1234, 9
    tokens = random_tokens(num_tokens, token_dtype)
    got = run(tokens, mode, seed, step, row0, batch, global_batch, num_tokens, seq_len, input_dtype=input_dtype)
    want = reference(tokens, mode, seed, step, row0, batch, global_batch, num_tokens, seq_len, input_dtype)
    assert_batch_equal(got, want, input_dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seq_len,block_size", [(7, 16), (129, 16), (256, 64), (33, 32)])
def test_several_column_blocks_per_row(mode, seq_len, block_size):
    # T not a multiple of BLOCK: the last block of each row is partly masked.
    num_tokens, batch = 2000, 2
    tokens = random_tokens(num_tokens, torch.uint16, seed=1)
    got = run(tokens, mode, 5, 3, 0, batch, batch, num_tokens, seq_len, block_size=block_size)
    assert_batch_equal(got, reference(tokens, mode, 5, 3, 0, batch, batch, num_tokens, seq_len))


@pytest.mark.parametrize("num_windows", [1, 2, 3, 5, 17, 63, 64, 65])
def test_shuffle_cycle_walk_small_domains(num_windows):
    # Feistel domains of 4, 16, 64 and 256 windows: most encryptions land outside [0, M) and walk.
    seq_len = 3
    num_tokens = num_windows * seq_len + 1 + (num_windows % seq_len)
    tokens = random_tokens(num_tokens, torch.uint16, seed=7)
    for step in (0, 5):
        got = run(tokens, "shuffle", 11, step, 0, num_windows, num_windows, num_tokens, seq_len)
        want = reference(tokens, "shuffle", 11, step, 0, num_windows, num_windows, num_tokens, seq_len)
        assert_batch_equal(got, want)
        # G = M: each step is one whole epoch, so the starts are a permutation of the windows.
        assert sorted(got[2].tolist()) == [w * seq_len for w in range(num_windows)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", [0, 2**62 + 5, 2**64 - 1, -1, -12345, 2**63])
def test_large_and_negative_seeds(mode, seed):
    num_tokens, seq_len, batch, global_batch = 1500, 16, 4, 8
    tokens = random_tokens(num_tokens, torch.uint32, seed=2)
    got = run(tokens, mode, seed, 3, 4, batch, global_batch, num_tokens, seq_len)
    assert_batch_equal(got, reference(tokens, mode, seed, 3, 4, batch, global_batch, num_tokens, seq_len))
    # gpuload takes seeds modulo 2**64: a negative seed is its 64-bit pattern.
    assert torch.equal(run(tokens, mode, seed & MASK64, 3, 4, batch, global_batch, num_tokens, seq_len)[0], got[0])


@pytest.mark.parametrize("mode,step", [("random", 2**60 - 1), ("random", 2**59 + 3),
                                       ("sequential", 2**60 - 1), ("shuffle", (2**62 + 5) // 8),
                                       ("shuffle", 10**15 + 3)])
def test_large_steps(mode, step):
    # Up to the last step of the contract's domain: (step + 1) * G <= 2**63 (gpuload/sampling.py).
    num_tokens, seq_len, batch, global_batch = 1500, 16, 4, 8
    tokens = random_tokens(num_tokens, torch.uint16, seed=3)
    got = run(tokens, mode, 77, step, 4, batch, global_batch, num_tokens, seq_len)
    assert_batch_equal(got, reference(tokens, mode, 77, step, 4, batch, global_batch, num_tokens, seq_len))


# A stream of 3 * 2**31 tokens: starts and positions need all 64 bits, while only a small span of it
# exists as a tensor (token_offset), so nothing large is allocated.
BIG_N, BIG_T, BIG_G = 3 * 2**31 + 17, 33, 64


def big_step(mode):
    if mode == "sequential":
        # Lands w mod M near 1.5e8 windows, i.e. starts near 5e9 > 2**32.
        return (5 * windows_per_epoch(BIG_N, BIG_T) + 150_000_000) // BIG_G
    return 1_000_007  # with seed 99: two of rows 8..11 start beyond 2**32 in random and shuffle


@pytest.mark.parametrize("mode", MODES)
def test_stream_beyond_2_32_tokens(mode):
    seed, step, row0, batch, pad = 99, big_step(mode), 8, 4, 3
    starts = window_starts(mode, seed, step, torch.arange(row0, row0 + batch), BIG_G, BIG_N, BIG_T)
    assert int(starts.max()) > 2**32
    for b, start in enumerate(starts.tolist()):
        # Each row alone, served by a resident span around its window.
        offset = start - pad
        tokens = position_tokens(offset, BIG_T + 1 + 2 * pad)
        got = run(tokens, mode, seed, step, row0 + b, 1, BIG_G, BIG_N, BIG_T, token_offset=offset)
        want = reference(tokens, mode, seed, step, row0 + b, 1, BIG_G, BIG_N, BIG_T, token_offset=offset)
        assert_batch_equal(got, want)
        assert got[0][0, 0].item() == start & 0xFFFFFFFF


@pytest.mark.parametrize("mode", MODES)
def test_window_outside_resident_span_is_minus_one(mode):
    # All rows' starts come out of the kernel; only row 0's window is resident, so the others are -1
    # unless they happen to fall inside the span too.
    seed, step, row0, batch = 99, big_step(mode), 8, 4
    starts = window_starts(mode, seed, step, torch.arange(row0, row0 + batch), BIG_G, BIG_N, BIG_T)
    offset = int(starts[0]) - 5
    tokens = position_tokens(offset, BIG_T + 20)
    x, y, got_starts = run(tokens, mode, seed, step, row0, batch, BIG_G, BIG_N, BIG_T, token_offset=offset)
    assert torch.equal(got_starts, starts)
    for b, start in enumerate(starts.tolist()):
        if offset <= start and start + BIG_T + 1 <= offset + tokens.numel():
            assert torch.equal(y[b], (torch.arange(start + 1, start + BIG_T + 1) & 0xFFFFFFFF))
        else:
            assert bool((x[b] == -1).all()) and bool((y[b] == -1).all())
    assert torch.equal(y[0], torch.arange(starts[0] + 1, starts[0] + BIG_T + 1) & 0xFFFFFFFF)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", [(), (1,)])
def test_step_tensor_equals_int_step_and_advances_in_place(mode, shape):
    num_tokens, seq_len, batch, global_batch = 1200, 9, 3, 6
    tokens = random_tokens(num_tokens, torch.uint16, seed=4).to(DEVICE)
    step = torch.full(shape, 41, dtype=torch.int64, device=DEVICE)
    out_x = torch.empty(batch, seq_len, dtype=torch.int64, device=DEVICE)
    out_y = torch.empty_like(out_x)
    for expected_step in (41, 42):
        # The same launch (same buffers, same step tensor) replayed after an in-place step update,
        # as a captured CUDA graph would be.
        x, y = gather_batch_triton(tokens, mode, 7, step, 3, batch, global_batch, num_tokens, seq_len,
                                   out_x=out_x, out_y=out_y)
        want_x, want_y = gather_batch_triton(tokens, mode, 7, expected_step, 3, batch, global_batch, num_tokens,
                                             seq_len)
        rx, ry, _ = reference(tokens.cpu(), mode, 7, expected_step, 3, batch, global_batch, num_tokens, seq_len)
        assert torch.equal(x, want_x) and torch.equal(y, want_y)
        assert torch.equal(x.cpu(), rx) and torch.equal(y.cpu(), ry)
        step += 1


def test_out_buffers_are_reused_and_overwritten():
    num_tokens, seq_len, batch = 800, 7, 5
    tokens = random_tokens(num_tokens, torch.uint32, seed=5).to(DEVICE)
    out_x = torch.full((batch, seq_len), -7, dtype=torch.int32, device=DEVICE)
    out_y = torch.full((batch, seq_len), -7, dtype=torch.int64, device=DEVICE)
    for step in (0, 1):
        x, y = gather_batch_triton(tokens, "shuffle", 1, step, 0, batch, batch, num_tokens, seq_len,
                                   out_x=out_x, out_y=out_y, input_dtype=torch.int32)
        assert x is out_x and y is out_y
        rx, ry, _ = reference(tokens.cpu(), "shuffle", 1, step, 0, batch, batch, num_tokens, seq_len, torch.int32)
        assert torch.equal(x.cpu(), rx) and torch.equal(y.cpu(), ry)


@pytest.mark.parametrize("unsigned,signed", [(torch.uint16, torch.int16), (torch.uint32, torch.int32)])
def test_signed_views_read_as_unsigned_tokens(unsigned, signed):
    num_tokens, seq_len, batch = 900, 8, 4
    tokens = random_tokens(num_tokens, unsigned, seed=6)
    got = run(tokens.view(signed), "random", 3, 2, 0, batch, batch, num_tokens, seq_len)
    assert_batch_equal(got, reference(tokens, "random", 3, 2, 0, batch, batch, num_tokens, seq_len))
    assert int(got[1].max()) >= 1 << (15 if unsigned == torch.uint16 else 31)


def test_block_size_heuristic_is_a_power_of_two_within_bounds():
    for batch, seq_len in [(1, 1), (8, 1024), (64, 2048), (512, 32768), (5, 129)]:
        block = triton_gather._block_size(batch, seq_len)
        assert block & (block - 1) == 0 and triton_gather._MIN_BLOCK <= block <= triton_gather._MAX_BLOCK
        assert block <= max(triton_gather._MIN_BLOCK, 2 * seq_len)


def bad_call(**overrides):
    args = dict(tokens=torch.zeros(100, dtype=torch.uint16, device=DEVICE), sampling="random", seed=0, step=0,
                row0=0, batch=2, global_batch=2, num_tokens=100, seq_len=8)
    args.update(overrides)
    gather_batch_triton(**args)


@pytest.mark.parametrize("overrides,match", [
    (dict(tokens=torch.zeros(100, dtype=torch.float32, device=DEVICE)), "1-D uint16/uint32"),
    (dict(tokens=torch.zeros(10, 10, dtype=torch.uint16, device=DEVICE)), "1-D uint16/uint32"),
    (dict(tokens=torch.zeros(200, dtype=torch.int16, device=DEVICE)[::2]), "contiguous"),
    (dict(sampling="zipf"), "unknown sampling"),
    (dict(input_dtype=torch.float32), "input_dtype"),
    (dict(row0=1), "global_batch"),
    (dict(seq_len=0), "seq_len >= 1"),
    (dict(num_tokens=8), "num_tokens"),
    (dict(num_tokens=2**63), "num_tokens"),
    (dict(token_offset=50), "inside the stream"),
    (dict(tokens=torch.zeros(5, dtype=torch.uint16, device=DEVICE)), "at least one window"),
    (dict(step=-1), "step must be"),
    (dict(step=torch.zeros(1, dtype=torch.int32, device=DEVICE)), "one int64 value"),
    (dict(step=torch.zeros(2, dtype=torch.int64, device=DEVICE)), "one int64 value"),
    (dict(out_x=torch.empty(2, 9, dtype=torch.int64, device=DEVICE)), "out_x must be a \\(2, 8\\)"),
    (dict(out_y=torch.empty(2, 8, dtype=torch.int32, device=DEVICE)), "out_y must be"),
    (dict(out_x=torch.empty(8, 2, dtype=torch.int64, device=DEVICE).t()), "contiguous"),
    (dict(out_starts=torch.empty(3, dtype=torch.int64, device=DEVICE)), "out_starts must be"),
    (dict(block_size=48), "power of two"),
])
def test_invalid_arguments_are_rejected(overrides, match):
    with pytest.raises(ValueError, match=match):
        bad_call(**overrides)


def test_cpu_tokens_without_interpreter_say_how_to_fix(monkeypatch):
    monkeypatch.setattr(triton_gather, "interpreter_active", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        bad_call(tokens=torch.zeros(100, dtype=torch.uint16))


def test_bench_kernels_quick(tmp_path, capsys):
    # Smoke run of benchmarks/bench_kernels.py (checks every provider against the reference first).

    path = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "bench_kernels.py")
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "kernels.json"
    result = bench.main(["--quick", "--json", str(out)])
    assert {row["provider"] for row in result["rows"]} == {"copy", "triton-random", "triton-sequential",
                                                            "triton-shuffle", "triton-random-mix3", "torch-random",
                                                            "triton-aligned-random", "triton-aligned-shuffle"}
    for row in result["rows"]:
        assert row["median_ms"] > 0 and row["gb_per_s"] > 0 and row["tokens_per_s"] > 0
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert "of copy" in capsys.readouterr().out


def chunked_ring_case(stream_at, mode, seed, step, row0, batch, global_batch, chunking, num_slots, slot_tokens,
                      token_dtype):
    """A ring holding the visits `step` reads (as gpuload/ring.py lays them out) and the reference batch."""
    rows = torch.arange(row0, row0 + batch)
    starts, visits = window_starts_and_visits(mode, seed, step, rows, global_batch, chunking.num_tokens,
                                              chunking.seq_len, chunking)
    ring = torch.zeros(num_slots * slot_tokens, dtype=token_dtype)
    for visit in set(visits.tolist()):
        chunk = chunking.visit_chunk(mode, seed, visit)
        length = chunking.chunk_length(chunk)
        base = (visit % num_slots) * slot_tokens
        ring[base:base + length] = stream_at(chunk * chunking.chunk_tokens, length)
    windows = torch.stack([stream_at(o, chunking.seq_len + 1) for o in starts.tolist()]).to(torch.int64)
    return ring, (windows[:, :-1], windows[:, 1:], starts)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("token_dtype", [torch.uint16, torch.uint32])
@pytest.mark.parametrize("batch,seq_len", [(1, 1), (5, 7), (3, 129)])
def test_chunked_ring_matches_reference(mode, token_dtype, batch, seq_len):
    num_tokens, global_batch, seed = 20_011, 6, 77
    tokens = random_tokens(num_tokens, token_dtype, seed=3)
    windows_per_chunk = max(global_batch, 2000 // seq_len)
    chunking = Chunking(num_tokens, seq_len, global_batch, windows_per_chunk)
    slot_tokens = chunking.max_chunk_tokens + 5
    for step, input_dtype in ((0, torch.int64), (7, torch.int32), (2**20 + 1, torch.int64)):
        ring, want = chunked_ring_case(lambda o, n: tokens[o:o + n], mode, seed, step, 1, batch, global_batch,
                                       chunking, 4, slot_tokens, token_dtype)
        got = run(ring, mode, seed, step, 1, batch, global_batch, num_tokens, seq_len, input_dtype=input_dtype,
                  chunking=chunking, num_slots=4, slot_tokens=slot_tokens)
        assert_batch_equal(got, (want[0].to(input_dtype), want[1], want[2]), input_dtype)



@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("counts,row0,batch", [([5, 2, 4], 0, 11), ([5, 2, 4], 3, 5), ([150, 90, 60], 281, 6)])
def test_mixture_launches_fill_their_rows_like_the_reference(mode, counts, row0, batch):
    """One launch per source writes exactly the rows mixture_rows gives it, each by its source's contract.

    300 rows take the in-kernel ranking through two blocks of hashes."""
    from gpuload.mixture import mixture_rows

    seed, seq_len = 5, 9
    sources = [random_tokens(n, torch.uint16, seed=k) for k, n in enumerate([3001, 700, 1500])]
    for step in (0, 3, 2**40 + 7):
        source, index = mixture_rows(seed, step, counts, torch.arange(row0, row0 + batch))
        for k, tokens in enumerate(sources):
            # A fresh sentinel batch per launch: rows of the other sources must come back untouched.
            x = torch.full((batch, seq_len), -7, dtype=torch.int64, device=DEVICE)
            y = torch.full((batch, seq_len), -7, dtype=torch.int64, device=DEVICE)
            starts = torch.full((batch,), -7, dtype=torch.int64, device=DEVICE)
            gather_batch_triton(tokens.to(DEVICE), mode, seed, step, row0, batch, counts[k], tokens.numel(), seq_len,
                                out_x=x, out_y=y, out_starts=starts, mixture=(counts, k))
            mine = source == k
            want_starts = torch.full((batch,), -7, dtype=torch.int64)
            want_x = torch.full((batch, seq_len), -7, dtype=torch.int64)
            want_y = want_x.clone()
            if bool(mine.any()):
                want_starts[mine] = window_starts(mode, seed, step, index[mine], counts[k], tokens.numel(), seq_len)
                windows = torch.stack([tokens[o:o + seq_len + 1].to(torch.int64) for o in want_starts[mine].tolist()])
                want_x[mine], want_y[mine] = windows[:, :-1], windows[:, 1:]
            assert torch.equal(starts.cpu(), want_starts), (step, k)
            assert torch.equal(x.cpu(), want_x) and torch.equal(y.cpu(), want_y), (step, k)


def test_mixture_source_on_a_chunked_ring_matches_reference():
    seed, seq_len, counts, mode = 11, 7, [3, 4], "shuffle"
    num_tokens = 20_011
    tokens = random_tokens(num_tokens, torch.uint32, seed=9)
    chunking = Chunking(num_tokens, seq_len, counts[1], 300)
    slot_tokens = chunking.max_chunk_tokens + 3
    from gpuload.mixture import mixture_rows

    for step in (0, 40, 1000):
        source, index = mixture_rows(seed, step, counts)
        mine = source == 1
        starts, visits = window_starts_and_visits(mode, seed, step, index[mine], counts[1], num_tokens, seq_len,
                                                  chunking)
        ring = torch.zeros(4 * slot_tokens, dtype=torch.uint32)
        for visit in set(visits.tolist()):
            chunk = chunking.visit_chunk(mode, seed, visit)
            length = chunking.chunk_length(chunk)
            ring[(visit % 4) * slot_tokens:][:length] = tokens[chunk * chunking.chunk_tokens:][:length]
        x = torch.full((7, seq_len), -1, dtype=torch.int64, device=DEVICE)
        y = torch.full((7, seq_len), -1, dtype=torch.int64, device=DEVICE)
        gather_batch_triton(ring.to(DEVICE), mode, seed, step, 0, 7, counts[1], num_tokens, seq_len, out_x=x,
                            out_y=y, chunking=chunking, num_slots=4, slot_tokens=slot_tokens, mixture=(counts, 1))
        windows = torch.stack([tokens[o:o + seq_len + 1].to(torch.int64) for o in starts.tolist()])
        assert torch.equal(x.cpu()[mine], windows[:, :-1]) and torch.equal(y.cpu()[mine], windows[:, 1:])
        assert bool((x.cpu()[~mine] == -1).all())


@pytest.mark.parametrize("mixture,match", [
    (([3, 4], 2), "0 <= source < len"), (([3, 4], 0), "global_batch == counts"),
])
def test_mixture_arguments_are_checked(mixture, match):
    tokens = random_tokens(100, torch.uint16).to(DEVICE)
    with pytest.raises(ValueError, match=match):
        gather_batch_triton(tokens, "random", 0, 0, 0, 2, 4, 100, 8, mixture=mixture)


# --- align='bos': starts drawn among document starts inside the kernel -------------------------------

BOS = 7


def document_tokens(num_tokens, token_dtype, num_docs, seed):
    """Random tokens over the dtype's range with BOS at `num_docs` random positions (position 0 included)."""
    tokens = random_tokens(num_tokens, token_dtype, seed=seed).to(torch.int64)
    tokens[tokens == BOS] = BOS + 1
    gen = torch.Generator().manual_seed(seed)
    tokens[torch.randperm(num_tokens, generator=gen)[:num_docs - 1]] = BOS
    tokens[0] = BOS
    return tokens.to(token_dtype)


@pytest.mark.parametrize("mode", ["random", "shuffle"])
@pytest.mark.parametrize("token_dtype", [torch.uint16, torch.uint32])
@pytest.mark.parametrize("batch,global_batch,num_docs", [(1, 1, 2), (5, 11, 40), (6, 12, 5)])
def test_aligned_matches_reference(mode, token_dtype, batch, global_batch, num_docs):
    # num_docs=5 < G: one step takes several epochs of the usable starts.
    num_tokens, seq_len = 2003, 9
    tokens = document_tokens(num_tokens, token_dtype, num_docs, seed=num_docs)
    usable = usable_document_starts(document_starts(tokens, BOS), num_tokens, seq_len)
    for seed, step, input_dtype in ((0, 0, torch.int64), (2**64 - 1, 3, torch.int32), (-12345, 2**40 + 7, torch.int64)):
        rows = torch.arange(global_batch - batch, global_batch)
        want_starts = aligned_window_starts(mode, seed, step, rows, global_batch, usable, num_tokens)
        want_x, want_y = gather_reference([tokens], torch.tensor([0, num_tokens]), want_starts, seq_len, input_dtype)
        got = run(tokens, mode, seed, step, global_batch - batch, batch, global_batch, num_tokens, seq_len,
                  input_dtype=input_dtype, doc_starts=usable.to(DEVICE))
        assert_batch_equal(got, (want_x, want_y, want_starts), input_dtype)
        assert bool((got[0][:, 0] == BOS).all())


def aligned_ring(stream, chunks, seed, visits, num_slots, slot_tokens, token_dtype=torch.uint16):
    """A ring holding `visits` as gpuload/ring.py lays them out for align='bos' (C + T tokens a visit)."""
    ring = torch.zeros(num_slots * slot_tokens, dtype=token_dtype)
    for visit in set(visits):
        first, count = chunks.span(chunks.visit_chunk(seed, visit))
        ring[(visit % num_slots) * slot_tokens:][:count] = stream[first:first + count]
    return ring


@pytest.mark.parametrize("mode", ["random", "shuffle"])
def test_aligned_chunked_ring_matches_reference(mode):
    from test_documents import chunked_fixture

    stream_list, usable, chunking, chunks = chunked_fixture(global_batch=6, windows_per_chunk=15)
    stream = torch.tensor(stream_list, dtype=torch.uint16)
    slot_tokens = chunks.span_tokens + 3
    D, G = usable.numel(), chunking.global_batch
    # Steps inside a pass, across the first pass boundary, and far ahead.
    for seed, step in ((3, 0), (3, 5), (3, D // G), (3, D // G + 1), (-1, 2 * D // G), (3, 2**40 + 1)):
        want_starts, visits = aligned_window_starts_and_visits(mode, seed, step, torch.arange(1, 5), G, usable,
                                                               chunking.num_tokens, chunks)
        want_x, want_y = gather_reference([stream], torch.tensor([0, stream.numel()]), want_starts, chunking.seq_len)
        first, last = chunks.step_visits(seed, step)
        ring = aligned_ring(stream, chunks, seed, range(first, last + 1), 4, slot_tokens)
        got = run(ring, mode, seed, step, 1, 4, G, chunking.num_tokens, chunking.seq_len, chunking=chunking,
                  num_slots=4, slot_tokens=slot_tokens, doc_starts=usable.to(DEVICE), aligned_chunks=chunks)
        assert_batch_equal(got, (want_x, want_y, want_starts))


def test_aligned_mixture_source_on_a_chunked_ring_matches_reference():
    from gpuload.mixture import mixture_rows
    from test_documents import chunked_fixture

    counts, seed = [3, 6], 4
    stream_list, usable, chunking, chunks = chunked_fixture(global_batch=counts[1], windows_per_chunk=15)
    stream = torch.tensor(stream_list, dtype=torch.uint16)
    slot_tokens = chunks.span_tokens
    for step in (0, 9, 2**30):
        source, index = mixture_rows(seed, step, counts)
        mine = source == 1
        starts, visits = aligned_window_starts_and_visits("shuffle", seed, step, index[mine], counts[1], usable,
                                                          chunking.num_tokens, chunks)
        first, last = chunks.step_visits(seed, step)
        ring = aligned_ring(stream, chunks, seed, range(first, last + 1), 4, slot_tokens)
        x = torch.full((9, chunking.seq_len), -1, dtype=torch.int64, device=DEVICE)
        y = torch.full((9, chunking.seq_len), -1, dtype=torch.int64, device=DEVICE)
        gather_batch_triton(ring.to(DEVICE), "shuffle", seed, step, 0, 9, counts[1], chunking.num_tokens,
                            chunking.seq_len, out_x=x, out_y=y, chunking=chunking, num_slots=4, slot_tokens=slot_tokens,
                            mixture=(counts, 1), doc_starts=usable.to(DEVICE), aligned_chunks=chunks)
        want_x, want_y = gather_reference([stream], torch.tensor([0, stream.numel()]), starts, chunking.seq_len)
        assert torch.equal(x.cpu()[mine], want_x) and torch.equal(y.cpu()[mine], want_y)
        assert bool((x.cpu()[~mine] == -1).all())


def test_aligned_arguments_are_checked():
    from test_documents import chunked_fixture

    _, usable, chunking, chunks = chunked_fixture(global_batch=6, windows_per_chunk=15)
    tokens = torch.zeros(chunking.num_tokens, dtype=torch.uint16, device=DEVICE)
    ring = torch.zeros(4 * chunks.span_tokens, dtype=torch.uint16, device=DEVICE)
    starts = usable.to(DEVICE)
    common = dict(seed=0, step=0, row0=0, batch=2, global_batch=6, num_tokens=chunking.num_tokens, seq_len=8)
    cases = [
        (dict(tokens=tokens, sampling="llmc", doc_starts=starts), "unknown sampling"),
        (dict(tokens=ring, sampling="sequential", doc_starts=starts, aligned_chunks=chunks, chunking=chunking,
              num_slots=4, slot_tokens=chunks.span_tokens), "need the whole stream in the ring"),
        (dict(tokens=tokens, sampling="random", doc_starts=starts.to(torch.int32)), "non-empty contiguous 1-D int64"),
        (dict(tokens=tokens, sampling="random", doc_starts=starts[:0]), "non-empty contiguous 1-D int64"),
        (dict(tokens=tokens, sampling="random", doc_starts=starts, aligned_chunks=chunks), "pass chunking= too"),
        (dict(tokens=ring, sampling="random", doc_starts=starts, chunking=chunking, num_slots=4,
              slot_tokens=chunks.span_tokens), "needs aligned_chunks="),
        (dict(tokens=ring, sampling="random", doc_starts=starts[1:], aligned_chunks=chunks, chunking=chunking,
              num_slots=4, slot_tokens=chunks.span_tokens), "needs aligned_chunks="),
        (dict(tokens=torch.zeros(4 * chunks.span_tokens, dtype=torch.uint16, device=DEVICE), sampling="random",
              doc_starts=starts, aligned_chunks=chunks, chunking=chunking, num_slots=4,
              slot_tokens=chunks.span_tokens - 1), "slots of at least"),
        (dict(tokens=ring, sampling="random", doc_starts=starts, aligned_chunks=chunks, chunking=chunking, num_slots=4,
              slot_tokens=chunks.span_tokens, step=torch.zeros(1, dtype=torch.int64, device=DEVICE)), "int step"),
    ]
    for overrides, match in cases:
        with pytest.raises(ValueError, match=match):
            gather_batch_triton(**{**common, **overrides})
