"""The ring: layouts, the chunked rule on every backend, background fills, faults and shutdown."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from gpuload import native
from gpuload import ring as ring_module
from gpuload.kernels import triton_gather
from gpuload.ring import NUM_SLOTS, plan_ring
from gpuload.sampling import Chunking, window_starts, window_starts_and_visits, windows_per_epoch
from gpuload.shards import TokenStream
from test_loader import loader  # one way to build a loader for a backend in the tests

TRITON = triton_gather.interpreter_active() or torch.cuda.is_available()
RING_BACKENDS = ["torch"] + (["triton"] if TRITON else [])
BACKENDS = RING_BACKENDS + (["native"] if native.available() else [])
MODES = ["random", "shuffle", "sequential"]
N, T, B = 6000, 8, 4
SMALL_RING = 4096  # uint32 tokens: 4 slots of one page (1024 tokens) -> chunks of 127 windows, 6 of them


def run(ld, steps):
    return [tuple(t.cpu() for t in next(ld)) for _ in range(steps)]


def assert_same(a, b):
    assert len(a) == len(b)
    for step, ((xa, ya), (xb, yb)) in enumerate(zip(a, b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb), f"step {step}"


def test_plan_whole_stream_when_it_fits():
    layout = plan_ring(N, 4, T, B, None)
    assert layout.chunking is None and (layout.num_slots, layout.slot_tokens) == (1, N)
    assert plan_ring(N, 4, T, B, N).chunking is None and plan_ring(N, 4, T, B, 10 * N).chunking is None


def test_plan_chunked_geometry_is_page_aligned():
    layout = plan_ring(N, 4, T, B, SMALL_RING)
    c = layout.chunking
    assert layout.num_slots == NUM_SLOTS and layout.slot_tokens == 1024 and layout.ring_tokens <= SMALL_RING
    assert (c.windows_per_chunk, c.chunk_tokens, c.num_chunks) == (127, 1016, 6)
    assert layout.slot_tokens * 4 % 4096 == 0 and c.max_chunk_tokens <= layout.slot_tokens
    assert c.last_windows == windows_per_epoch(N, T) - 5 * 127


def test_plan_default_budget_chunks_large_streams(monkeypatch):
    monkeypatch.setattr(ring_module, "default_ring_bytes", lambda: 64 << 10)
    layout = plan_ring(1 << 20, 2, 64, 8, None)
    assert layout.chunking is not None and layout.ring_tokens * 2 <= 64 << 10


def test_plan_refuses_a_ring_smaller_than_a_global_batch_per_slot():
    with pytest.raises(ValueError, match=r"ring_tokens=5000 is too small .* at least 8192"):
        plan_ring(100_000, 4, 1000, 1, 5000)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_rule_reads_only_its_visits_chunk(mode):
    c = Chunking(N, T, 6, 127)
    for step in list(range(0, 300, 7)) + [10**9]:
        starts, visits = window_starts_and_visits(mode, 3, step, torch.arange(6), 6, N, T, c)
        first, last = c.step_visits(mode, step)
        assert visits.min() == first and visits.max() == last and last - first <= 2
        for o, v in zip(starts.tolist(), visits.tolist()):
            chunk = c.visit_chunk(mode, 3, v)
            assert chunk * c.chunk_tokens <= o and o + T + 1 <= chunk * c.chunk_tokens + c.chunk_length(chunk)


def test_chunked_shuffle_takes_every_window_once_per_epoch():
    c = Chunking(N, T, 6, 127)
    M = windows_per_epoch(N, T)
    starts = torch.cat([window_starts("shuffle", 9, s, torch.arange(6), 6, N, T, c) for s in range(2 * M // 6 + 1)])
    for epoch in range(2):
        assert sorted(starts[epoch * M:(epoch + 1) * M].tolist()) == list(range(0, M * T, T))
    assert starts[:M].tolist() != list(range(0, M * T, T)) and starts[:M].tolist() != starts[M:2 * M].tolist()


def test_chunked_random_covers_the_whole_stream_tail_included():
    c = Chunking(N, T, 100, 127)  # the last chunk also holds the stream's tail past the last whole window
    starts = torch.cat([window_starts("random", 1, s, torch.arange(100), 100, N, T, c) for s in range(600)])
    assert starts.min() == 0 and starts.max() == N - T - 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_sequential_is_the_same_whatever_the_ring(make_shards, backend, dtype):
    # The smallest page-aligned rings: 4 slots of 1024 uint32 or 2048 uint16 tokens, a few chunks per stream.
    sizes, seq_len, ring = ([2500, 3, 3497], 8, 4 * 1024) if dtype == np.uint32 else ([5000, 3, 9000], 16, 4 * 2048)
    paths = make_shards(sizes, dtype=dtype)  # a shard shorter than a window
    steps = windows_per_epoch(sum(sizes), seq_len) // B + 10  # past the end of the epoch
    whole = run(loader(paths, batch_size=B, seq_len=seq_len, sampling="sequential", backend="torch"), steps)
    small = loader(paths, batch_size=B, seq_len=seq_len, sampling="sequential", backend=backend, ring_tokens=ring)
    assert small.sources[0].chunking is not None and small.sources[0].chunking.num_chunks >= 6
    assert_same(run(small, steps), whole)


# Steps on both sides of visit boundaries (random: a visit every 31 steps; shuffle: every 127 windows),
# reached by jumps that also restart the ring's filler.
STEPS_AT = [0, 1, 30, 31, 32, 63, 64, 190, 191, 5000]


def batches_at(ld, steps):
    out = []
    for step in steps:
        ld.load_state_dict({**ld.state_dict(), "step": step})
        starts = ld.window_starts(step)
        x, y = (t.cpu() for t in next(ld))
        assert torch.equal(x, starts[:, None] + torch.arange(T)) and torch.equal(y, x + 1)
        out.append((x, y))
    return out


@pytest.mark.parametrize("mode", ["random", "shuffle"])
def test_small_ring_batches_are_the_chunked_rule_on_every_backend(make_shards, mode):
    paths = make_shards([N])
    runs = {}
    for backend in BACKENDS:
        ld = loader(paths, batch_size=B, seq_len=T, sampling=mode, seed=5, backend=backend, ring_tokens=SMALL_RING)
        runs[backend] = batches_at(ld, STEPS_AT)
    for backend in BACKENDS[1:]:
        assert_same(runs[backend], runs[BACKENDS[0]])
    whole = batches_at(loader(paths, batch_size=B, seq_len=T, sampling=mode, seed=5, backend="torch"), STEPS_AT)
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(runs["torch"], whole))  # the chunked rule differs


@pytest.mark.parametrize("backend", RING_BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_small_ring_deterministic_and_exactly_resumable(make_shards, backend, mode):
    paths = make_shards([N])
    kw = dict(batch_size=B, seq_len=T, sampling=mode, seed=2, backend=backend, ring_tokens=SMALL_RING)
    before, after = (60, 40) if backend == "torch" else (8, 6)  # the interpreted kernel is slow
    ld = loader(paths, **kw)
    ld.load_state_dict({**ld.state_dict(), "step": 28})  # visits change during the run
    first = run(ld, before)
    state = ld.state_dict()
    rest = run(ld, after)
    again = loader(paths, **kw)
    again.load_state_dict({**state, "step": 28})
    assert_same(run(again, before), first)
    resumed = loader(paths, **kw)
    resumed.load_state_dict(state)
    assert_same(run(resumed, after), rest)
    # Backwards within the same loader: the ring refills from the earlier visit.
    ld.load_state_dict({**state, "step": 29})
    assert_same(run(ld, 4), first[1:5])


def test_resume_refuses_another_chunking_except_for_sequential(make_shards):
    paths = make_shards([N])
    for mode in ("random", "shuffle"):
        state = loader(paths, batch_size=B, seq_len=T, sampling=mode, ring_tokens=SMALL_RING).state_dict()
        with pytest.raises(ValueError, match="ring chunking .* saved ring_tokens"):
            loader(paths, batch_size=B, seq_len=T, sampling=mode).load_state_dict(state)
    state = loader(paths, batch_size=B, seq_len=T, sampling="sequential", ring_tokens=SMALL_RING).state_dict()
    loader(paths, batch_size=B, seq_len=T, sampling="sequential").load_state_dict(state)


def test_slow_fills_make_the_consumer_wait_not_diverge(make_shards, monkeypatch):
    """Batches do not depend on I/O timing: a filler slower than the consumer only delays next()."""
    paths = make_shards([N])
    kw = dict(batch_size=B, seq_len=T, sampling="shuffle", seed=4, backend="torch", ring_tokens=SMALL_RING)
    expected = run(loader(paths, **kw), 120)
    real_read_into = TokenStream.read_into

    def slow_read_into(self, out, start):
        time.sleep(0.01)
        real_read_into(self, out, start)

    monkeypatch.setattr(TokenStream, "read_into", slow_read_into)
    assert_same(run(loader(paths, **kw), 120), expected)


def test_filler_never_overwrites_a_visit_in_use(make_shards):
    """The filler stays at most NUM_SLOTS - 1 visits ahead of the lowest visit the consumer still reads."""
    paths = make_shards([N])
    ld = loader(paths, batch_size=B, seq_len=T, sampling="sequential", backend="torch", ring_tokens=SMALL_RING)
    for _ in range(150):
        next(ld)
        time.sleep(0.002)  # let the filler run as far ahead as it may
        filler = ld.sources[0].ring.filler
        assert filler.ready - filler.low < NUM_SLOTS


def test_static_buffers_reuse_outputs(make_shards):
    paths = make_shards([N])
    for backend in BACKENDS:
        fresh = run(loader(paths, batch_size=B, seq_len=T, backend=backend), 3)
        ld = loader(paths, batch_size=B, seq_len=T, backend=backend, static_buffers=True)
        outs = [next(ld) for _ in range(3)]
        assert all(x is outs[0][0] and y is outs[0][1] for x, y in outs), backend
        assert torch.equal(outs[-1][0].cpu(), fresh[-1][0]) and torch.equal(outs[-1][1].cpu(), fresh[-1][1])


def test_read_error_in_the_filler_surfaces_at_next(make_shards):
    paths = make_shards([N // 2, N // 2])
    ld = loader(paths, batch_size=B, seq_len=T, sampling="sequential", backend="torch", ring_tokens=SMALL_RING)
    next(ld)
    os.truncate(paths[1], 1024 + 4 * 100)  # header + 100 tokens of 3000
    start = time.monotonic()
    # The native copy meets the lost pages (SIGBUS, as ShardFault), pread the end of file; both name the shard.
    with pytest.raises(OSError, match=f"{paths[1]}: .*(truncated from|unexpected end of file|SIGBUS)"):
        for _ in range(N // (B * T)):
            next(ld)
    assert time.monotonic() - start < 30
    with pytest.raises(OSError):  # the error stays; no batch from a half-filled slot
        next(ld)
    ld.close()


def test_whole_stream_read_error_surfaces_at_first_next(make_shards):
    paths = make_shards([N])
    ld = loader(paths, batch_size=B, seq_len=T, backend="torch")
    os.truncate(paths[0], 1024 + 4 * 10)
    with pytest.raises(OSError, match=paths[0]):
        next(ld)


def test_close_stops_the_filler_and_frees_the_ring(make_shards):
    paths = make_shards([N])
    with loader(paths, batch_size=B, seq_len=T, backend="torch", ring_tokens=SMALL_RING) as ld:
        next(ld)
        ring = ld.sources[0].ring
        thread = ring.filler.thread
        assert thread.is_alive()  # waiting for a free slot
    assert not thread.is_alive() and ring.host is None and ld.sources[0].ring is None
    with pytest.raises(RuntimeError, match="closed"):
        next(ld)


def test_dropping_the_loader_stops_the_filler(make_shards):
    ld = loader(make_shards([N]), batch_size=B, seq_len=T, backend="torch", ring_tokens=SMALL_RING)
    next(ld)
    thread = ld.sources[0].ring.filler.thread
    del ld
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_unclosed_loader_does_not_hang_exit(make_shards):
    paths = make_shards([200_000])
    code = f"""
from gpuload import GPULoader
ld = GPULoader({paths!r}, batch_size=4, seq_len=64, device="cpu", backend="torch", rank=0, world_size=1,
               ring_tokens=16384)
next(ld)
keep = ld  # still referenced at exit, filler waiting for a free slot
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_out_of_pinned_memory_says_how_to_lower_ring_tokens(make_shards, monkeypatch):
    def refuse(count, dtype, pinned):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(ring_module, "_allocate_host", refuse)
    with pytest.raises(MemoryError, match=r"could not allocate the ring: 6000 tokens .* smaller ring_tokens="):
        loader(make_shards([N]), batch_size=B, seq_len=T, backend="torch")


def test_invalid_ring_arguments(make_shards):
    paths = make_shards([N])
    with pytest.raises(ValueError, match="placement must be one of"):
        loader(paths, batch_size=B, seq_len=T, placement="host")
    with pytest.raises(ValueError, match="ring_tokens must be >= 1"):
        loader(paths, batch_size=B, seq_len=T, ring_tokens=0)
    with pytest.raises(ValueError, match="ring_tokens must be an integer"):
        loader(paths, batch_size=B, seq_len=T, ring_tokens=4096.0)


def test_concurrent_close_during_a_wait_raises_instead_of_hanging(make_shards, monkeypatch):
    paths = make_shards([N])
    ld = loader(paths, batch_size=B, seq_len=T, sampling="sequential", backend="torch", ring_tokens=SMALL_RING)
    gate = threading.Event()
    real_read_into = TokenStream.read_into

    def blocked_read_into(self, out, start):
        gate.wait(10)
        real_read_into(self, out, start)

    monkeypatch.setattr(TokenStream, "read_into", blocked_read_into)
    errors = []

    def consume():
        try:
            next(ld)
        except Exception as e:
            errors.append(e)

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.3)
    closer = threading.Thread(target=ld.close)
    closer.start()
    time.sleep(0.3)
    gate.set()
    consumer.join(20)
    closer.join(20)
    assert not consumer.is_alive() and not closer.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError) and "closed" in str(errors[0])
