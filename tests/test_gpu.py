"""The CUDA path on a real GPU: every placement and ring layout against the CPU reference, mixtures, aligned
rows and doc info, static buffers, the filler thread's device, exact pinned memory, close() under load, and
a CUDA graph captured while the ring refills. Skipped without CUDA (tests/test_cuda.py covers the same
ordering on the CPU against a stand-in)."""

import threading

import numpy as np
import pytest
import torch

from gpuload import GPULoader
from gpuload import cuda as cuda_module
from gpuload.cuda import page_rounded
from test_loader import loader

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MODES = ["random", "shuffle", "sequential"]
N, T, B = 6000, 8, 4
SMALL_RING = 4096  # uint32: 4 slots of one page -> 6 chunks: the slots are reused every few dozen steps


def on_cpu(batches):
    return [tuple(t.cpu() for t in batch) for batch in batches]


def take(ld, steps):
    return [next(ld) for _ in range(steps)]


def assert_equal_batches(got, want):
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(on_cpu(got), want)):
        for a, b in zip(g, w):
            assert torch.equal(a, b), f"step {step}"


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
@pytest.mark.parametrize("ring_tokens", [None, SMALL_RING])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [np.uint16, np.uint32])
def test_triton_equals_the_cpu_reference(make_shards, placement, ring_tokens, mode, dtype):
    paths = make_shards([N // 2, N // 2], dtype=dtype)
    ring = None if ring_tokens is None else ring_tokens * 4 // np.dtype(dtype).itemsize
    kw = dict(batch_size=B, seq_len=T, sampling=mode, seed=2**63 + 5, ring_tokens=ring)
    want = take(loader(paths, backend="torch", device="cpu", **kw), 120)
    ld = loader(paths, backend="triton", device="cuda", placement=placement, **kw)
    got = take(ld, 120)
    x, y = got[0]
    assert x.device == y.device == torch.device("cuda", torch.cuda.current_device())
    assert x.is_contiguous() and y.is_contiguous() and y.dtype == torch.int64
    assert_equal_batches(got, want)
    ld.close()


@pytest.mark.parametrize("backend,placement", [("native", "device"), ("torch", "device"), ("torch", "zero-copy")])
def test_host_backends_deliver_on_the_gpu(make_shards, backend, placement):
    if backend == "native":
        pytest.importorskip("gpuload._native")
    paths = make_shards([N])
    kw = dict(batch_size=B, seq_len=T, sampling="shuffle", seed=3, ring_tokens=SMALL_RING)
    want = take(loader(paths, backend="torch", device="cpu", **kw), 60)
    got = take(loader(paths, backend=backend, device="cuda", placement=placement, **kw), 60)
    assert got[0][0].device.type == "cuda"
    assert_equal_batches(got, want)


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
@pytest.mark.parametrize("ring_tokens", [None, 4 * 4096])
def test_mixture_aligned_doc_info_equal_the_cpu_reference(tmp_path, placement, ring_tokens):
    from gpuload.shards import write_shard

    rng = np.random.default_rng(0)
    paths = {}
    for k, name in enumerate(["web", "code"]):
        tokens = rng.integers(1, 1000, 20_000 - 8000 * k).astype(np.uint16)
        tokens[rng.choice(tokens.size, tokens.size // 60, replace=False)] = 7
        tokens[0] = 7
        (tmp_path / name).mkdir()
        write_shard(tmp_path / name / "train_0.bin", tokens)
        paths[name] = [str(tmp_path / name / "train_0.bin")]
    kw = dict(weights={"web": 2, "code": 1}, batch_size=6, seq_len=16, sampling="shuffle", seed=5, bos_token=7,
              align="bos", doc_info=True, ring_tokens=ring_tokens)
    want = take(loader(paths, backend="torch", device="cpu", **kw), 40)
    got = take(loader(paths, backend="triton", device="cuda", placement=placement, **kw), 40)
    for step, ((x, y, doc), (wx, wy, wdoc)) in enumerate(zip(got, want)):
        assert torch.equal(x.cpu(), wx) and torch.equal(y.cpu(), wy), step
        assert torch.equal(doc.position_ids.cpu(), wdoc.position_ids), step
        assert torch.equal(doc.cu_seqlens.cpu(), wdoc.cu_seqlens) and doc.max_seqlen == wdoc.max_seqlen, step


def test_static_buffers_are_written_in_place(make_shards):
    paths = make_shards([N])
    want = take(loader(paths, backend="torch", device="cpu", batch_size=B, seq_len=T), 5)
    ld = loader(paths, backend="triton", device="cuda", batch_size=B, seq_len=T, static_buffers=True)
    pointers = set()
    for w in want:
        x, y = next(ld)
        pointers.add((x.data_ptr(), y.data_ptr()))
        assert torch.equal(x.cpu(), w[0]) and torch.equal(y.cpu(), w[1])
    assert len(pointers) == 1


def test_plain_cuda_device_name_works_on_every_placement(tmp_path):
    from gpuload.shards import write_shard

    path = str(tmp_path / "docs.bin")
    write_shard(path, (np.arange(N) % 100).astype(np.uint32))  # a document (token 0) every 100 tokens
    for placement in ("device", "zero-copy"):
        for ring_tokens in (None, SMALL_RING):
            for align in (None, "bos"):
                ld = GPULoader(path, batch_size=B, seq_len=T, device="cuda", backend="triton", placement=placement,
                               ring_tokens=ring_tokens, rank=0, world_size=1, bos_token=0, align=align)
                assert ld.device == torch.device("cuda", torch.cuda.current_device())
                for x, _ in take(ld, 3):
                    assert x.device == ld.device and (align is None or bool((x[:, 0] == 0).all()))
                ld.close()


def test_filler_thread_runs_on_the_loaders_device_and_side_stream(make_shards, monkeypatch):
    seen = []
    enter = cuda_module.CudaOps.enter_thread

    def recording_enter(self, stream=None):
        enter(self, stream)
        seen.append((torch.cuda.current_device(), torch.cuda.current_stream(), stream))

    monkeypatch.setattr(cuda_module.CudaOps, "enter_thread", recording_enter)
    device = torch.cuda.device_count() - 1  # the last GPU: not the one a fresh thread starts on, when there are two
    ld = loader(make_shards([N]), backend="triton", device=f"cuda:{device}", batch_size=B, seq_len=T,
                ring_tokens=SMALL_RING)
    take(ld, 3)
    ld.close()
    assert seen and all(current == device and stream is not None and current_stream == stream
                        for current, current_stream, stream in seen)


def test_rings_pin_exactly_and_give_it_back(make_shards):
    paths = make_shards([N])
    before = torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
    zero_copy = loader(paths, backend="triton", device="cuda", placement="zero-copy", batch_size=B, seq_len=T,
                       ring_tokens=SMALL_RING)
    ring = zero_copy.sources[0].ring
    assert ring.host.is_pinned() and ring.pinned_bytes() == page_rounded(ring.layout.ring_tokens * 4)
    device = loader(paths, backend="triton", device="cuda", placement="device", batch_size=B, seq_len=T)
    take(zero_copy, 3)
    take(device, 3)
    assert device.sources[0].ring.pinned_bytes() == 0  # whole stream on the device: its staging went back
    # Nothing of the rings came from torch's caching host allocator (which rounds up and never unpins).
    assert torch.cuda.host_memory_stats().get("allocated_bytes.current", 0) == before
    zero_copy.close()
    device.close()
    assert ring.pinned_bytes() == 0 and ring.host is None


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
def test_close_right_after_next_under_refills(make_shards, placement):
    """close() while copies and gathers are queued: the batches already returned stay right, and memory
    allocated right after (blocks the size of the ring's, from the same pool) is not written by them."""
    paths = make_shards([N])
    kw = dict(batch_size=B, seq_len=T, sampling="shuffle", seed=1, ring_tokens=SMALL_RING)
    want = take(loader(paths, backend="torch", device="cpu", **kw), 50)
    for _ in range(5):
        ld = loader(paths, backend="triton", device="cuda", placement=placement, **kw)
        got = take(ld, 50)
        ld.close()
        scratch = [torch.full((SMALL_RING,), -1, dtype=torch.int32, device="cuda") for _ in range(16)]
        assert_equal_batches(got, want)
        assert all(bool((block == -1).all()) for block in scratch)


def test_graph_capture_while_the_ring_refills(make_shards, monkeypatch):
    """The training loop captures CUDA graphs (global mode, torch's default) while the fill thread copies and
    waits on events: each capture stays open until the thread has made CUDA calls during it."""
    from gpuload import ring as ring_module

    in_capture, filler_ran = threading.Event(), threading.Event()
    take_buffer = ring_module._Staging.take

    def take_during_capture(self):
        taken = take_buffer(self)  # may wait on an event: a call the global capture mode would forbid
        if in_capture.is_set():
            filler_ran.set()
        return taken

    monkeypatch.setattr(ring_module._Staging, "take", take_during_capture)
    monkeypatch.setattr(ring_module, "FILL_PIECE_BYTES", 64 << 10)  # many copies and waits per visit
    paths = make_shards([8_000_000])  # 32 MB; the ring's 4 slots of 4 MB hold a visit of ~4096 steps each
    kw = dict(batch_size=B, seq_len=64, sampling="sequential", ring_tokens=4 << 20)
    reference = loader(paths, backend="torch", device="cpu", **kw)
    ld = loader(paths, backend="triton", device="cuda", placement="device", **kw)
    static = torch.zeros(1024, device="cuda")
    got, want, overlapped = [], [], 0
    for jump in range(10):
        for each in (ld, reference):  # each jump restarts the fill, which then loads 3 visits
            each.load_state_dict({**each.state_dict(), "step": jump * 10_007})
        got.append(next(ld))
        want.append(next(reference))
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            static.add_(1)  # warm-up outside the capture, as torch.cuda.graph wants
        torch.cuda.current_stream().wait_stream(side)
        filler_ran.clear()
        with torch.cuda.graph(graph):
            in_capture.set()
            static.mul_(2)
            overlapped += filler_ran.wait(5)
            in_capture.clear()
        graph.replay()
    torch.cuda.synchronize()
    assert overlapped >= 5  # the fill thread really worked during most captures
    assert_equal_batches(got, want)
    ld.close()


@pytest.mark.parametrize("kw", [dict(static_buffers=False), dict(static_buffers=True, ring_tokens=SMALL_RING)])
def test_next_inside_a_capture_that_cannot_work_says_what_to_do(make_shards, kw):
    """Fresh outputs, or a ring that refills: the step needs the host, so a capture is refused, not repeated."""
    ld = loader(make_shards([N]), backend="triton", device="cuda", batch_size=B, seq_len=T, **kw)
    next(ld)
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="CUDA graph is being captured"):
        with torch.cuda.graph(graph):
            next(ld)
    assert ld.step == 1
    next(ld)


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
@pytest.mark.parametrize("mixture,docs,align,rows,columns", [
    (False, False, False, B, T), (True, False, False, B, T), (False, True, False, B, T), (False, False, True, B, T),
    (False, False, False, 512, 1024),  # 2 warps and 1024 programs a launch: the counter's barrier matters
])
def test_each_replay_of_a_captured_next_gathers_the_next_batch(tmp_path, make_shards, placement, mixture, docs,
                                                               align, rows, columns):
    from gpuload.documents import doc_info_reference

    paths = make_shards([max(N, 4 * rows * columns)])
    files = {"a": paths, "b": make_shards([4000], prefix="b")} if mixture else paths
    kw = dict(batch_size=rows, seq_len=columns, sampling="shuffle", seed=9,
              weights={"a": 1, "b": 1} if mixture else None)
    if docs:
        kw.update(bos_token=0, doc_info=True)  # token = position: one document, whose start no row holds
    if align:
        kw.update(bos_token=0, align="bos", sampling="random")  # rows all start at position 0
    want = take(loader(files, backend="torch", device="cpu", **kw), 12)
    ld = loader(files, backend="triton", device="cuda", placement=placement, static_buffers=True, **kw)
    assert_equal_batches([next(ld)[:2]], [want[0][:2]])  # step 0 eagerly: compiles, loads the ring
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        batch = next(ld)  # captured, not run: the gather reads the device step and advances it
        checksum = batch[0].sum() + batch[1].sum()
    for step in range(1, 11):  # the larger shape replays 10 times too: 10 launches of 1024 programs
        graph.replay()
        assert torch.equal(batch[0].cpu(), want[step][0]) and torch.equal(batch[1].cpu(), want[step][1]), step
        assert int(checksum) == int(want[step][0].sum() + want[step][1].sum())
        if docs:
            ref = doc_info_reference(want[step][0], 0, ld.doc_capacity)
            assert torch.equal(batch[2].cu_seqlens.cpu(), ref.cu_seqlens)
            assert torch.equal(batch[2].position_ids.cpu(), ref.position_ids)
    assert ld.step == 11 and ld.state_dict()["step"] == 11  # the only sync: the device counter read back
    x = next(ld)[0]  # the eager path goes on from the counter too
    assert torch.equal(x.cpu(), want[11][0])


def test_two_threads_on_one_loader_are_served_in_turn(make_shards):
    ld = loader(make_shards([N]), backend="triton", device="cuda", batch_size=B, seq_len=T, ring_tokens=SMALL_RING)
    errors, got = [], []

    def run():
        try:
            for _ in range(50):
                x, y = next(ld)
                got.append((int(x[0, 0]), x.cpu(), y.cpu()))
        except RuntimeError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == [] and len(got) == 100 and ld.step == 100
    ld.close()


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
@pytest.mark.parametrize("static_buffers", [False, True])
@pytest.mark.parametrize("remainder", [False, True])
def test_packed_rows_equal_the_cpu_reference(tmp_path, placement, static_buffers, remainder):
    """pack='bestfit' on the GPU: the planner's positions through the pinned buffers, one packed-gather launch,
    against the torch backend on the CPU, with doc info; steps far enough apart to reuse both pinned buffers."""
    from test_packing import packed_shards

    paths, _, _ = packed_shards(tmp_path, T=32)
    kw = dict(batch_size=3, seq_len=32, bos_token=0, pack="bestfit", pack_remainder=remainder, seed=4,
              rank=0, world_size=1, doc_info=True)
    want = take(GPULoader(paths, device="cpu", backend="torch", **kw), 12)
    got = take(GPULoader(paths, device="cuda", backend="triton", placement=placement,
                         static_buffers=static_buffers, **kw), 12)
    for step, ((gx, gy, gdoc), (wx, wy, wdoc)) in enumerate(zip(got, want)):
        if static_buffers and step < 11:
            continue  # the same tensors every step: only the last batch is still there
        assert torch.equal(gx.cpu(), wx) and torch.equal(gy.cpu(), wy), step
        assert torch.equal(gdoc.cu_seqlens.cpu(), wdoc.cu_seqlens), step
