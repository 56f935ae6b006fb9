"""GPULoader's arguments and environment: the per-node ring budget, threads sharing a loader, and the bounds
that must be refused with a ValueError rather than fail deep inside (issue 14)."""

import threading

import numpy as np
import pytest
import torch

from gpuload import GPULoader, native
from gpuload import ring as ring_module
from gpuload.plan import default_rank_world, local_world_size
from gpuload.shards import write_shard

BACKENDS = ["torch"] + (["native"] if native.available() else [])


@pytest.fixture
def shard(tmp_path):
    """shard(n) -> the path of a uint16 shard holding arange(n) % 50000."""

    def make(n, name="a.bin"):
        path = str(tmp_path / name)
        write_shard(path, np.arange(n, dtype=np.uint16) % 50000)
        return path

    return make


@pytest.fixture
def node_env(monkeypatch):
    """No launcher variables, unless a test sets them."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def make(path, backend="torch", **kw):
    kw.setdefault("batch_size", 2)
    kw.setdefault("seq_len", 16)
    return GPULoader(path, device="cpu", rank=kw.pop("rank", 0), world_size=kw.pop("world_size", 1), backend=backend,
                     **kw)


# 5. The default ring budget is per node.

NODE_BYTES = 8 << 20  # the node budget in these tests: min(8 MiB, RAM/8) is 8 MiB on any test machine


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_ring_is_a_share_of_the_node_budget(shard, node_env, backend):
    node_env.setattr(ring_module, "DEFAULT_RING_BYTES", NODE_BYTES)
    path = shard(1_500_000)  # 3 MB: fits the node budget, not a quarter of it
    node_env.setenv("LOCAL_WORLD_SIZE", "1")  # else a machine with several GPUs would count them
    alone = make(path, backend)
    assert alone.sources[0].chunking is None and alone.sources[0].layout.ring_tokens == 1_500_000
    node_env.setenv("LOCAL_WORLD_SIZE", "4")
    shared = make(path, backend)
    layout = shared.sources[0].layout
    assert layout.chunking is not None and layout.ring_tokens * 2 <= NODE_BYTES // 4
    assert layout.ring_tokens * 2 == 2 << 20  # 4 slots of 256 Ki tokens: the 2 MiB share exactly
    held = "0.0 MiB (native reads the memory maps in place)" if backend == "native" else "2.0 MiB host"
    assert f"node=4 ranks x {held}" in repr(shared)
    assert "node=1 rank x " in repr(alone)
    # A second loader of the rank (a validation loader) takes a share of its own, not half of one.
    assert make(path, backend, sampling="sequential").sources[0].layout == layout


@pytest.mark.skipif(not native.available(), reason="native extension not built")
def test_native_follows_the_shared_chunking(shard, node_env):
    """The native backend holds no ring, but chunks by the same share: its batches stay the torch backend's."""
    node_env.setattr(ring_module, "DEFAULT_RING_BYTES", NODE_BYTES)
    node_env.setenv("LOCAL_WORLD_SIZE", "4")
    path = shard(1_500_000)
    a, b = make(path, "torch", seed=3), make(path, "native", seed=3)
    assert b.sources[0].windows_per_chunk == a.sources[0].windows_per_chunk > 0
    for _ in range(3):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_default_ring_bytes_divides_the_node_budget(node_env):
    node = ring_module.default_ring_bytes()
    assert ring_module.default_ring_bytes(8) == node // 8
    with pytest.raises(ValueError, match="local_ranks must be an integer >= 1"):
        ring_module.default_ring_bytes(0)


def test_local_world_size_from_torchrun_or_the_cuda_devices(node_env):
    node_env.setattr(torch.cuda, "is_available", lambda: False)
    assert local_world_size() == 1
    node_env.setattr(torch.cuda, "is_available", lambda: True)
    node_env.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_world_size() == 8  # a rank per GPU
    node_env.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_world_size() == 1
    node_env.setenv("LOCAL_WORLD_SIZE", "2")
    assert local_world_size() == 2  # torchrun's count wins


@pytest.mark.parametrize("value", ["eight", "0", "-2", "1.5"])
def test_malformed_local_world_size_is_refused(shard, node_env, value):
    node_env.setenv("LOCAL_WORLD_SIZE", value)
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE"):
        make(shard(1000))


# 6. One loader, several threads.

@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_get_whole_distinct_steps(shard, backend):
    B, T, per_thread = 2, 16, 200
    path = shard(50_000)
    reference = make(path, backend, batch_size=B, seq_len=T, seed=7)
    step_of = {}
    for step in range(2 * per_thread):
        x, y = next(reference)
        step_of[(x.numpy().tobytes(), y.numpy().tobytes())] = step
    assert len(step_of) == 2 * per_thread  # every step's batch tells its step

    shared = make(path, backend, batch_size=B, seq_len=T, seed=7)
    start = threading.Barrier(2)
    got, errors = [[], []], []

    def pull(out):
        try:
            start.wait()
            for _ in range(per_thread):
                x, y = next(shared)
                out.append((x.numpy().tobytes(), y.numpy().tobytes()))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pull, args=(out,)) for out in got]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    steps = sorted(step_of.get(batch, -1) for batch in got[0] + got[1])
    assert steps == list(range(2 * per_thread))  # no batch of no step, none twice
    assert shared.state_dict()["step"] == 2 * per_thread


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_state_dict_while_another_thread_pulls_is_never_lost(shard, backend):
    """Each load_state_dict lands between two whole steps: the next batch is the loaded step's."""
    path = shard(50_000)  # token = position: x[:, 0] is the row's window start
    ld = make(path, backend, seed=5)
    targets, span = [10_000, 20_000, 30_000, 40_000, 50_000], 1000  # the puller runs < span steps per target
    step_of = {tuple(ld.window_starts(s).tolist()): s for base in [0] + targets for s in range(base, base + span)}
    state, starts, stop = ld.state_dict(), [], threading.Event()

    def pull():
        while not stop.is_set():
            starts.append(tuple(next(ld)[0][:, 0].tolist()))

    puller = threading.Thread(target=pull)
    puller.start()
    try:
        for target in targets:
            pulled = len(starts)
            while len(starts) < pulled + 20 and puller.is_alive():
                stop.wait(0.0005)
            ld.load_state_dict({**state, "step": target})
            assert target <= ld.state_dict()["step"] < target + span  # at or after the load, never before
        pulled = len(starts)
        while len(starts) < pulled + 20 and puller.is_alive():
            stop.wait(0.0005)
    finally:
        stop.set()
        puller.join(120)
    steps = [step_of[s] for s in starts]
    jumps = [b for a, b in zip(steps, steps[1:]) if b != a + 1]
    assert steps[0] == 0 and jumps == targets, steps


def test_close_does_not_wait_for_a_next_in_another_thread(shard):
    """A next() blocked in a ring fill holds the loader's lock; close() must still return and end it."""
    path = shard(400_000)
    ld = make(path, "torch", batch_size=4, seq_len=64, ring_tokens=32_768, sampling="shuffle")
    errors, started = [], threading.Event()

    def spin():
        try:
            while True:
                next(ld)
                started.set()
        except RuntimeError as e:
            errors.append(e)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    assert started.wait(60)
    ld.close()
    thread.join(60)
    assert not thread.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])


# 9. Out-of-range arguments are ValueErrors.

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(world_size=2**62), dict(world_size=2**63), dict(batch_size=2**40),
                                dict(batch_size=2**62), dict(batch_size=1, seq_len=2**31)])
def test_huge_batches_are_refused(shard, backend, kw):
    # Refused before anything is allocated: the last one, at the 2**31-token bound, needs no 32 GiB to fail.
    with pytest.raises(ValueError, match=r"tokens per (global )?batch"):
        next(make(shard(10_000), backend, **kw))


def test_the_largest_batch_is_taken(shard):
    ld = make(shard(10_000), "torch", batch_size=1, seq_len=1, world_size=2**62)  # G * T = 2**62
    assert ld.global_batch == 2**62


@pytest.mark.parametrize("backend", ["auto"] + BACKENDS)
def test_cuda_without_cuda_is_refused_at_construction(shard, monkeypatch, backend):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        GPULoader(shard(10_000), batch_size=2, seq_len=16, device="cuda", backend=backend, rank=0, world_size=1)


@pytest.mark.parametrize("step", [True, False, 1.0, "1", -1, None])
@pytest.mark.parametrize("method", ["window_starts", "row_sources"])
def test_steps_must_be_integers_of_the_domain(shard, step, method):
    ld = make(shard(10_000), "torch")
    with pytest.raises(ValueError, match="step must be"):
        getattr(ld, method)(step)
    assert torch.equal(getattr(ld, method)(np.int64(1))[0], getattr(ld, method)(1)[0])


# 10. Seeds are 64-bit words.

@pytest.mark.parametrize("seed", [-1, 2**64, 2**64 + 3, -(2**63)])
def test_seeds_outside_64_bits_are_refused(shard, seed):
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        make(shard(10_000), "torch", seed=seed)


@pytest.mark.parametrize("seed", [-1, 2**64])
def test_states_with_seeds_outside_64_bits_are_refused(shard, seed):
    path = shard(10_000)
    ld = make(path, "torch", seed=2**64 - 1)  # the largest seed is taken
    state = ld.state_dict()
    ld.load_state_dict(state)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*64\)"):
        ld.load_state_dict({**state, "seed": seed})


# 11. RANK and WORLD_SIZE come together.

@pytest.mark.parametrize("present,absent", [("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")])
def test_a_lone_rank_or_world_size_is_refused(shard, node_env, present, absent):
    node_env.setenv(present, "1")
    with pytest.raises(ValueError, match=rf"{present}=1, {absent} unset"):
        default_rank_world()
    with pytest.raises(ValueError, match="RANK and WORLD_SIZE"):
        GPULoader(shard(10_000), batch_size=2, seq_len=16, device="cpu", backend="torch")
    ld = GPULoader(shard(10_000), batch_size=2, seq_len=16, device="cpu", backend="torch", rank=0, world_size=1)
    assert (ld.rank, ld.world_size) == (0, 1)  # arguments need no environment
