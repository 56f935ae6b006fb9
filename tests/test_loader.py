"""GPULoader: the batch contract on synthetic token = position shards, backends, ranks and resume."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from gpuload import GPULoader, native
from gpuload.kernels import triton_gather
from gpuload.sampling import window_starts

# Triton runs through its CPU interpreter here (tests/conftest.py sets TRITON_INTERPRET=1) or on CUDA.
TRITON = triton_gather.interpreter_active() or torch.cuda.is_available()
BACKENDS = ["torch"] + (["native"] if native.available() else []) + (["triton"] if TRITON else [])
MODES = ["random", "shuffle", "sequential"]


def loader(paths, **kw):
    on_gpu = kw.get("backend") == "triton" and not triton_gather.interpreter_active()
    kw.setdefault("device", "cuda" if on_gpu else "cpu")
    kw.setdefault("rank", 0)
    kw.setdefault("world_size", 1)
    return GPULoader(paths, **kw)


def batches(ld, steps):
    return [next(ld) for _ in range(steps)]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_sequential_exact_across_shard_boundaries_and_wrap(make_shards, backend, dtype):
    sizes = [50, 7, 80, 13]  # 150 tokens; T=16: M = 9 windows, shards shorter than a window
    paths = make_shards(sizes, dtype=dtype)
    B, T, N = 4, 16, sum(sizes)
    ld = loader(paths, batch_size=B, seq_len=T, sampling="sequential", backend=backend)
    modulus = 1 << (8 * np.dtype(dtype).itemsize)
    for step in range(5):
        x, y = next(ld)
        for b in range(B):
            o = ((step * B + b) % ((N - 1) // T)) * T
            assert x[b].tolist() == [p % modulus for p in range(o, o + T)]
            assert y[b].tolist() == [p % modulus for p in range(o + 1, o + T + 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_rows_are_contiguous_windows(make_shards, backend, mode):
    paths = make_shards([300, 1, 2, 500, 40])
    ld = loader(paths, batch_size=8, seq_len=33, sampling=mode, seed=11, backend=backend)
    for step in range(10):
        starts = ld.window_starts(ld.step)
        x, y = (t.cpu() for t in next(ld))
        assert x.shape == y.shape == (8, 33) and x.is_contiguous() and y.is_contiguous()
        assert x.dtype == y.dtype == torch.int64
        expected = starts[:, None] + torch.arange(33)
        assert torch.equal(x, expected) and torch.equal(y, expected + 1)


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
@pytest.mark.parametrize("input_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("B,T", [(1, 1), (5, 7), (3, 129)])
def test_backends_equal_torch_reference(make_shards, backend, mode, dtype, input_dtype, B, T):
    paths = make_shards([3, 400, 1, 90, 250], dtype=dtype)
    if dtype == np.uint32 and input_dtype == torch.int64:  # tokens past 2**31 must not come out negative
        arr = np.memmap(paths[1], dtype=np.uint32, mode="r+", offset=1024)
        arr[::3] = 2**32 - 1 - np.arange(arr[::3].size, dtype=np.uint32)
        arr.flush()
        del arr
    kw = dict(batch_size=B, seq_len=T, sampling=mode, seed=2**63 + 3, input_dtype=input_dtype)
    ref = batches(loader(paths, backend="torch", **kw), 12)
    got = batches(loader(paths, backend=backend, **kw), 12)
    assert_same(ref, [(x.cpu(), y.cpu()) for x, y in got])
    assert ref[0][0].dtype == input_dtype and ref[0][1].dtype == torch.int64
    if dtype == np.uint32 and input_dtype == torch.int64:
        assert int(torch.cat([y for _, y in ref]).max()) >= 2**31 or mode == "sequential"


@pytest.mark.parametrize("mode", MODES)
def test_deterministic_and_seeded(make_shards, mode):
    paths = make_shards([5000])
    a = batches(loader(paths, batch_size=4, seq_len=32, sampling=mode, seed=1), 4)
    assert_same(a, batches(loader(paths, batch_size=4, seq_len=32, sampling=mode, seed=1), 4))
    if mode != "sequential":
        b = batches(loader(paths, batch_size=4, seq_len=32, sampling=mode, seed=2), 4)
        assert not all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_ranks_partition_the_global_batch(make_shards, mode):
    paths = make_shards([2000, 3000])
    single = batches(loader(paths, batch_size=12, seq_len=20, sampling=mode, seed=4), 3)
    per_rank = [batches(loader(paths, batch_size=3, seq_len=20, sampling=mode, seed=4, rank=r, world_size=4), 3)
                for r in range(4)]
    for step in range(3):
        assert torch.equal(torch.cat([per_rank[r][step][0] for r in range(4)]), single[step][0])
        assert torch.equal(torch.cat([per_rank[r][step][1] for r in range(4)]), single[step][1])


@pytest.mark.parametrize("mode", MODES)
def test_exact_and_elastic_resume(make_shards, mode):
    paths = make_shards([700, 900])
    B, T, G = 4, 16, 8
    straight = batches(loader(paths, batch_size=G, seq_len=T, sampling=mode, seed=7), 10)

    ranks = [loader(paths, batch_size=B, seq_len=T, sampling=mode, seed=7, rank=r, world_size=2) for r in range(2)]
    for ld in ranks:
        batches(ld, 6)
    state = json.loads(json.dumps(ranks[0].state_dict()))  # survives a JSON round trip
    assert state["step"] == 6

    # Resume on 4 ranks of 2 rows (same G), with a different constructor seed: the state wins.
    resumed = [loader(paths, batch_size=2, seq_len=T, sampling=mode, seed=999, rank=r, world_size=4) for r in range(4)]
    for ld in resumed:
        ld.load_state_dict(state)
    for step in range(6, 10):
        got = [next(ld) for ld in resumed]
        assert torch.equal(torch.cat([x for x, _ in got]), straight[step][0])
        assert torch.equal(torch.cat([y for _, y in got]), straight[step][1])


@pytest.mark.parametrize("change,field", [
    (dict(seq_len=8), "seq_len"), (dict(batch_size=3), "global_batch"), (dict(sampling="shuffle"), "sampling"),
])
def test_resume_refuses_other_shapes(make_shards, change, field):
    paths = make_shards([1000])
    base = dict(batch_size=4, seq_len=16, sampling="random")
    state = loader(paths, **base).state_dict()
    with pytest.raises(ValueError, match=field):
        loader(paths, **{**base, **change}).load_state_dict(state)


def test_resume_refuses_other_dataset(make_shards, tmp_path):
    a = make_shards([1000], prefix="a")
    b = make_shards([1001], prefix="b")
    state = loader(a, batch_size=2, seq_len=8).state_dict()
    with pytest.raises(ValueError, match="dataset"):
        loader(b, batch_size=2, seq_len=8).load_state_dict(state)
    with pytest.raises(ValueError, match="not a gpuload loader state"):
        loader(a, batch_size=2, seq_len=8).load_state_dict({"step": 3})


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size"), (dict(seq_len=0), "seq_len"), (dict(sampling="bogus"), "sampling"),
    (dict(rank=2, world_size=2), "rank"), (dict(rank=-1, world_size=2), "rank"),
    (dict(input_dtype=torch.float32), "input_dtype"), (dict(backend="cuda-magic"), "backend"),
    (dict(seed=1.5), "seed"), (dict(rank=0.5, world_size=2), "rank"), (dict(batch_size=True), "batch_size"),
    (dict(seq_len="8"), "seq_len"),
])
def test_invalid_arguments(make_shards, kwargs, match):
    paths = make_shards([1000])
    kw = dict(batch_size=2, seq_len=8, device="cpu")
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GPULoader(paths, **kw)


def test_numpy_integers_are_integers(make_shards):
    ld = GPULoader(make_shards([1000]), batch_size=np.int64(2), seq_len=np.int32(8), seed=np.uint64(3),
                   rank=np.int64(0), world_size=np.int64(1), device="cpu")
    assert (ld.batch_size, ld.seq_len, ld.seed) == (2, 8, 3) and type(ld.seed) is int
    assert next(ld)[0].shape == (2, 8)


@pytest.mark.parametrize("change,match", [
    (dict(step=-1), "step"), (dict(step=2**63), "step"), (dict(step=3.7), "step must be an integer"),
    (dict(seed="12"), "seed must be an integer"), (dict(sources=None), "sources must be a list"),
])
def test_resume_refuses_malformed_states(make_shards, change, match):
    ld = loader(make_shards([1000]), batch_size=2, seq_len=8)
    state = {**ld.state_dict(), **change}
    with pytest.raises(ValueError, match=match):
        ld.load_state_dict(state)
    state = ld.state_dict()
    del state["step"]
    with pytest.raises(ValueError, match="missing step"):
        ld.load_state_dict(state)
    assert ld.step == 0  # a refused state changes nothing


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint16_tokens_wrap_at_65536(make_shards, backend):
    paths = make_shards([40_000, 40_000], dtype=np.uint16)  # positions past 65536 hold position - 65536
    ld = loader(paths, batch_size=2, seq_len=1000, sampling="sequential", backend=backend)
    ld.load_state_dict({**ld.state_dict(), "step": 32})  # windows 64, 65: tokens 64000 .. 66000
    x, y = (t.cpu() for t in next(ld))
    expected = torch.arange(64_000, 66_000).reshape(2, 1000) % 65536
    assert torch.equal(x, expected) and torch.equal(y, (expected + 1) % 65536)


def test_close_while_another_thread_gathers_does_not_crash(make_shards):
    """The native table keeps the memory maps alive for a call in flight (run apart: a regression segfaults)."""
    paths = make_shards([3_000_000])
    code = f"""
import threading
from gpuload import GPULoader
ld = GPULoader({paths!r}, batch_size=256, seq_len=4096, device="cpu", rank=0, world_size=1)
errors = []
def spin():
    try:
        while True:
            next(ld)
    except Exception as e:
        errors.append(e)
for _ in range(20):
    t = threading.Thread(target=spin)
    t.start()
    ld.close()
    t.join()
    ld = GPULoader({paths!r}, batch_size=256, seq_len=4096, device="cpu", rank=0, world_size=1)
assert len(errors) == 20 and all(isinstance(e, RuntimeError) and "closed" in str(e) for e in errors), errors
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


def test_default_device_follows_local_rank(monkeypatch):
    from gpuload.loader import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert default_device() == torch.device("cuda", 5)  # mp.spawn + torch.cuda.set_device, no torchrun
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device() == torch.device("cpu")


def test_rank_and_world_from_torchrun_environment(make_shards, monkeypatch):
    paths = make_shards([1000])
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ld = GPULoader(paths, batch_size=2, seq_len=8, device="cpu")
    assert (ld.rank, ld.world_size, ld.global_batch) == (2, 3, 6)
    assert torch.equal(ld.window_starts(0), window_starts("random", 0, 0, torch.arange(4, 6), 6, 1000, 8))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    ld = GPULoader(paths, batch_size=2, seq_len=8, device="cpu")
    assert (ld.rank, ld.world_size) == (0, 1)


def test_default_device_is_cpu_without_cuda(make_shards):
    ld = GPULoader(make_shards([100]), batch_size=1, seq_len=8)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    x, y = next(ld)
    assert x.device.type == y.device.type == expected


def test_fresh_tensors_each_step(make_shards):
    ld = loader(make_shards([1000]), batch_size=2, seq_len=8, sampling="sequential")
    x0, _ = next(ld)
    kept = x0.clone()
    next(ld)
    assert torch.equal(x0, kept)


def test_close_and_context_manager(make_shards):
    with loader(make_shards([1000]), batch_size=2, seq_len=8) as ld:
        next(ld)
    with pytest.raises(RuntimeError, match="closed"):
        next(ld)


def test_no_native_switch_forces_torch_backend(make_shards):
    paths = make_shards([1000])
    code = ("from gpuload import GPULoader, native_available; "
            f"ld = GPULoader({paths!r}, batch_size=2, seq_len=8, device='cpu'); "
            "print(native_available(), ld.backend)")
    env = {**os.environ, "GPULOAD_NO_NATIVE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "torch"]
    with pytest.raises(subprocess.CalledProcessError) as info:
        subprocess.run([sys.executable, "-c", code.replace("device='cpu'", "device='cpu', backend='native'")],
                       env=env, capture_output=True, text=True, check=True)
    assert "GPULOAD_NO_NATIVE" in info.value.stderr


def test_demo_prints_batches(capsys, tmp_path):
    from gpuload.demo import run_demo

    run_demo(directory=str(tmp_path), batch_size=2, seq_len=8, steps=2, sampling="sequential")
    out = capsys.readouterr().out
    assert "step 1" in out and "row 1: starts at token     24" in out


@pytest.mark.skipif(not native.available(), reason="native extension not built")
@pytest.mark.parametrize("faulthandler", [False, True])
def test_shard_truncated_while_training_is_an_error_not_a_crash(make_shards, faulthandler):
    """A read of a lost page of a memmap raises SIGBUS; the native gather turns it into OSError naming the file."""
    paths = make_shards([50_000, 400_000], dtype=np.uint16)
    code = f"""
import os
from gpuload import GPULoader
ld = GPULoader({paths!r}, batch_size=4, seq_len=1000, sampling="sequential", device="cpu", rank=0, world_size=1,
               backend="native")
next(ld)
os.truncate({paths[1]!r}, 1024 + 2 * 100_000)  # keep the header and 100,000 of the 400,000 tokens
ld.load_state_dict({{**ld.state_dict(), "step": 100}})  # windows 400..403: tokens past 400,000
try:
    next(ld)
except OSError as e:
    print("OSError:", e)
"""
    args = [sys.executable] + (["-X", "faulthandler"] if faulthandler else []) + ["-c", code]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("OSError: " + paths[1]) and "truncated or changed while training" in out.stdout


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pass_for_evaluation(make_shards, backend):
    paths = make_shards([500, 301])  # 801 tokens, T=8: 100 windows; G=6 -> 16 whole global batches, 4 windows dropped
    ranks = [loader(paths, batch_size=3, seq_len=8, sampling="sequential", loop=False, backend=backend,
                    rank=r, world_size=2) for r in range(2)]
    assert [len(ld) for ld in ranks] == [16, 16]
    starts = []
    for ld in ranks:
        got = [x[:, 0].cpu() for x, _ in ld]  # a for loop ends at StopIteration
        assert len(got) == 16
        starts.append(torch.stack(got))
        with pytest.raises(StopIteration):
            next(ld)
    every = torch.cat([starts[0], starts[1]], dim=1).flatten()  # global rows of each step, in order
    assert every.tolist() == list(range(0, 96 * 8, 8))  # each window once, in order, the last 4 dropped
    ranks[0].load_state_dict({**ranks[0].state_dict(), "step": 15})
    assert len(list(ranks[0])) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_evaluation_pass_is_whole(make_shards, backend):
    """A validation loader kept across evaluations: each iter() is a fresh pass, as a DataLoader's."""
    ld = loader(make_shards([500, 301]), batch_size=3, seq_len=8, sampling="sequential", loop=False, backend=backend)
    first = [x.cpu() for x, _ in ld]
    assert len(first) == len(ld) == 33
    with pytest.raises(StopIteration):  # past the end, next() keeps saying so
        next(ld)
    with pytest.raises(StopIteration):
        next(ld)
    for _ in range(2):
        again = [x.cpu() for x, _ in ld]
        assert len(again) == 33 and all(torch.equal(a, b) for a, b in zip(first, again))
    partial = iter(ld)
    next(partial), next(partial)
    assert len(list(ld)) == 33  # a new iter() starts over, also from the middle of a pass
    ld.load_state_dict({**ld.state_dict(), "step": 30})
    assert len(list(ld)) == 3  # the first iter() after a resume goes on with the loaded pass
    assert len(list(ld)) == 33


def test_one_pass_needs_sequential_and_has_no_length_when_looping(make_shards):
    paths = make_shards([1000])
    with pytest.raises(ValueError, match="loop=False .* needs sampling='sequential'"):
        loader(paths, batch_size=2, seq_len=8, sampling="shuffle", loop=False)
    with pytest.raises(TypeError, match="infinite"):
        len(loader(paths, batch_size=2, seq_len=8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_info_marks_documents_of_each_row(tmp_path, backend):
    from gpuload.documents import doc_info_reference
    from gpuload.shards import write_shard

    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 1000, 3000).astype(np.uint16)
    tokens[rng.choice(3000, 150, replace=False)] = 0  # documents of random lengths, bos = 0
    write_shard(tmp_path / "docs_0.bin", tokens)
    ld = loader(str(tmp_path / "docs_0.bin"), batch_size=3, seq_len=40, bos_token=0, doc_info="exact", backend=backend)
    for _ in range(3):
        x, y, doc = next(ld)
        want = doc_info_reference(x.cpu(), 0)
        assert torch.equal(doc.position_ids.cpu(), want.position_ids)
        assert torch.equal(doc.cu_seqlens.cpu(), want.cu_seqlens) and doc.max_seqlen == want.max_seqlen
        restarts = (x.cpu() == 0) | (torch.arange(40) == 0)
        assert torch.equal(doc.position_ids.cpu() == 0, restarts)
    with pytest.raises(ValueError, match="need bos_token=ID"):
        loader(str(tmp_path / "docs_0.bin"), batch_size=3, seq_len=40, doc_info=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_info_by_default_has_fixed_shapes_and_needs_no_sync(tmp_path, backend):
    from gpuload.documents import doc_info_reference, document_starts, max_segments_per_row
    from gpuload.shards import write_shard

    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 1000, 5000).astype(np.uint16)
    tokens[rng.choice(5000, 400, replace=False)] = 0
    tokens[2000:2030:2] = 0  # a burst of tiny documents: the busiest window sets the default capacity
    path = str(tmp_path / "docs_0.bin")
    write_shard(path, tokens)
    ld = loader(path, batch_size=4, seq_len=40, bos_token=0, doc_info=True, backend=backend, sampling="shuffle")
    bound = max_segments_per_row(document_starts([tokens], 0), 40)
    assert ld.doc_capacity == 4 * bound
    for _ in range(30):
        x, y, doc = next(ld)
        want = doc_info_reference(x.cpu(), 0, ld.doc_capacity)
        assert doc.cu_seqlens.shape == (ld.doc_capacity + 1,) and doc.max_seqlen == 40  # T: a bound, no sync
        assert torch.equal(doc.cu_seqlens.cpu(), want.cu_seqlens)
        assert torch.equal(doc.position_ids.cpu(), want.position_ids)
        assert isinstance(doc.num_segments, torch.Tensor) and int(doc.num_segments) == int(want.num_segments)
        assert int(doc.num_segments) <= ld.doc_capacity
    small = loader(path, batch_size=4, seq_len=40, bos_token=0, doc_info=True, doc_capacity=4, backend=backend)
    x, _, doc = next(small)
    assert int(doc.num_segments) > 4 and doc.cu_seqlens.shape == (5,)  # an overflow shows, without a sync
    assert torch.equal(doc.cu_seqlens.cpu(), doc_info_reference(x.cpu(), 0, 4).cu_seqlens)
    for bad, match in ((dict(doc_capacity=3), r"doc_capacity must be in \[batch_size"),
                       (dict(doc_capacity=8, doc_info="exact"), "pass doc_info=True"),
                       (dict(doc_info="fast"), "doc_info must be")):
        with pytest.raises(ValueError, match=match):
            loader(path, batch_size=4, seq_len=40, bos_token=0, **{"doc_info": True, **bad})


def document_shards(tmp_path, dtype=np.uint16):
    from gpuload.shards import write_shard

    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 1000, 4000).astype(dtype)
    tokens[rng.choice(4000, 60, replace=False)] = 7  # documents of random lengths, bos = 7
    tokens[:1] = 7
    write_shard(tmp_path / "docs_0.bin", tokens[:2500])
    write_shard(tmp_path / "docs_1.bin", tokens[2500:])
    return [str(tmp_path / "docs_0.bin"), str(tmp_path / "docs_1.bin")], tokens


@pytest.mark.parametrize("mode", ["random", "shuffle"])
def test_aligned_rows_start_at_documents_on_every_backend(tmp_path, mode):
    paths, tokens = document_shards(tmp_path)
    usable = [p for p in np.flatnonzero(tokens == 7).tolist() if p + 33 <= tokens.size]
    runs = {}
    for backend in BACKENDS:
        ld = loader(paths, batch_size=4, seq_len=32, sampling=mode, seed=3, bos_token=7, align="bos",
                    backend=backend)
        runs[backend] = [tuple(t.cpu() for t in next(ld)) for _ in range(8)]
        for x, y in runs[backend]:
            assert (x[:, 0] == 7).all() and torch.equal(x[:, 1:], y[:, :-1])
    for backend in BACKENDS[1:]:
        assert_same(runs[backend], runs["torch"])
    if mode == "shuffle":  # one epoch of D rows takes every usable document start once
        ld = loader(paths, batch_size=len(usable), seq_len=32, sampling=mode, bos_token=7, align="bos")
        assert sorted(ld.window_starts(0).tolist()) == usable


def test_aligned_resume_and_errors(tmp_path, make_shards):
    paths, _ = document_shards(tmp_path)
    kw = dict(batch_size=2, seq_len=32, sampling="shuffle", bos_token=7, align="bos")
    ld = loader(paths, **kw)
    batches(ld, 5)
    state = ld.state_dict()
    rest = batches(ld, 5)
    resumed = loader(paths, **kw)
    resumed.load_state_dict(state)
    assert_same(batches(resumed, 5), rest)
    with pytest.raises(ValueError, match="align_bos .* differs"):
        loader(paths, batch_size=2, seq_len=32, sampling="shuffle").load_state_dict(state)
    with pytest.raises(ValueError, match="need bos_token"):
        loader(paths, batch_size=2, seq_len=32, align="bos")
    with pytest.raises(ValueError, match="sampling='llmc' reads llm.c's fixed windows"):
        loader(paths, batch_size=2, seq_len=32, sampling="llmc", bos_token=7, align="bos")
    # Position tokens hold a single 7 in 20,000: fewer usable starts than a global batch on a chunked ring.
    with pytest.raises(ValueError, match=r"align='bos' in .*shard_0.bin: .* needs at least one global batch of usable "
                                         r"document starts, found 1"):
        loader(make_shards([20_000]), batch_size=2, seq_len=32, bos_token=7, align="bos", ring_tokens=8192)
    with pytest.raises(ValueError, match=r"align='bos' in .*docs_0.bin"):
        loader(paths, batch_size=2, seq_len=32, bos_token=999_999, align="bos")


def long_document_shards(tmp_path, num_tokens=60_000, num_docs=400):
    """Two shards of documents of random lengths (bos = 7), long enough for a ring of a few chunks."""
    from gpuload.shards import write_shard

    rng = np.random.default_rng(2)
    tokens = rng.integers(1, 1000, num_tokens).astype(np.uint16)
    tokens[rng.choice(num_tokens, num_docs, replace=False)] = 7
    half = num_tokens // 2
    write_shard(tmp_path / "docs_0.bin", tokens[:half])
    write_shard(tmp_path / "docs_1.bin", tokens[half:])
    return [str(tmp_path / "docs_0.bin"), str(tmp_path / "docs_1.bin")], tokens


@pytest.mark.parametrize("mode", ["random", "shuffle"])
def test_aligned_rows_on_a_ring_smaller_than_the_stream(tmp_path, mode):
    from gpuload.documents import aligned_window_starts

    paths, tokens = long_document_shards(tmp_path)
    kw = dict(batch_size=4, seq_len=32, sampling=mode, seed=3, bos_token=7, align="bos", ring_tokens=4 * 4096)
    runs = {}
    for backend in BACKENDS:
        ld = loader(paths, backend=backend, **kw)
        assert ld.sources[0].aligned is not None and ld.sources[0].aligned.num_visited > 4
        runs[backend] = [tuple(t.cpu() for t in next(ld)) for _ in range(40)]  # enough steps to cycle the 4 slots
        source = ld.sources[0]
        for step, (x, y) in enumerate(runs[backend]):
            starts = aligned_window_starts(mode, 3, step, torch.arange(4), 4, source.doc_starts.cpu(), tokens.size,
                                           source.aligned)
            assert (x[:, 0] == 7).all()
            assert torch.equal(x, torch.from_numpy(tokens.astype(np.int64))[starts[:, None] + torch.arange(32)])
            assert torch.equal(x[:, 1:], y[:, :-1])
        ld.close()
    for backend in BACKENDS[1:]:
        assert_same(runs[backend], runs["torch"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_aligned_small_ring_resumes_exactly_on_another_world_size(tmp_path, backend):
    paths, _ = long_document_shards(tmp_path)
    kw = dict(seq_len=32, sampling="shuffle", seed=1, bos_token=7, align="bos", ring_tokens=4 * 4096, backend=backend)
    ld = loader(paths, batch_size=4, **kw)
    batches(ld, 30)
    state = json.loads(json.dumps(ld.state_dict()))
    rest = batches(ld, 12)
    halves = [loader(paths, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for half in halves:
        half.load_state_dict(state)
    for x, y in rest:
        parts = [next(half) for half in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
    with pytest.raises(ValueError, match="ring chunking differs"):
        loader(paths, batch_size=4, **{**kw, "ring_tokens": 8 * 4096}).load_state_dict(state)


@pytest.mark.skipif(not TRITON, reason="needs the triton backend (CUDA, or the interpreter)")
@pytest.mark.parametrize("weights", [None, {"a": 2, "b": 1}])
def test_static_buffers_keep_the_step_on_the_device(make_shards, tmp_path, weights):
    """Static outputs on whole-stream rings: the kernel reads the step from a device counter and advances it
    (what a CUDA graph replays); batches, state_dict and resume are exactly the host-stepped ones."""
    paths = make_shards([3000])
    files = paths if weights is None else {"a": paths, "b": make_shards([2000], prefix="b")}
    kw = dict(batch_size=4, seq_len=16, sampling="shuffle", seed=3, backend="triton", weights=weights)
    want = [tuple(t.cpu() for t in batch) for batch in batches(loader(files, **kw), 12)]
    ld = loader(files, static_buffers=True, **kw)
    assert ld._producer.counter is not None
    got = [tuple(t.cpu().clone() for t in next(ld)) for _ in range(8)]  # static: the same tensors every step
    assert ld.step == 8 and ld.state_dict()["step"] == 8  # read back from the device counter
    assert_same(got, want[:8])
    resumed = loader(files, static_buffers=True, **kw)
    resumed.load_state_dict(ld.state_dict())
    assert_same([tuple(t.cpu().clone() for t in next(resumed)) for _ in range(4)], want[8:])
    # The kernel takes the step from the counter, not from the host: a stale host step changes nothing.
    stale = [tuple(t.cpu().clone() for t in ld._producer.produce(0)) for _ in range(3)]
    assert_same(stale, want[8:11])
    ld.close()
    assert ld.state_dict()["step"] == 11  # read back at close
    chunked = loader(make_shards([6000], prefix="long"), static_buffers=True, ring_tokens=4096,
                     **{**kw, "weights": None})
    assert chunked.sources[0].chunking is not None
    assert chunked._producer.counter is None  # a ring that refills needs the host every step
