"""gpuload/cuda.py and the ring's CUDA path on the CPU: device names, exact pinned memory, the filler
thread's setup, and the ordering of copies, gathers and close() against a stand-in that runs queued
work late (tests/fake_cuda.py). tests/test_gpu.py runs the same paths on a real GPU."""

import threading

import numpy as np
import pytest
import torch

from gpuload import GPULoader
from gpuload import cuda as cuda_module
from gpuload.cuda import PAGE_BYTES, CudaOps, PinnedHost, resolve_device
from gpuload.kernels.gather import gather_reference
from gpuload.ring import FILL_PIECE_BYTES, Ring, plan_ring
from gpuload.sampling import window_starts_and_visits
from gpuload.shards import TokenStream
from fake_cuda import FakeGPU

N, T, G = 6000, 8, 4
SMALL_RING = 4096  # uint32: 4 slots of 1024 tokens, chunks of 127 windows


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as on a machine with two GPUs, current device 0 (nothing else of CUDA works)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_resolve_device_always_names_the_cuda_index(two_gpus):
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"2 CUDA device\(s\): use cuda:0 .. cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="not a device name"):
        resolve_device("gpu0")


def test_resolve_device_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available here .* device='cpu'"):
        resolve_device("cuda")


def test_loader_on_plain_cuda_holds_an_indexed_device(two_gpus, make_shards):
    # The native backend builds nothing on the device, so it constructs here; every backend shares the rule.
    pytest.importorskip("gpuload._native")
    ld = GPULoader(make_shards([N]), batch_size=G, seq_len=T, device="cuda", backend="native", rank=0, world_size=1)
    assert ld.device == torch.device("cuda", 0) and ld.device.index == 0


def test_default_device_with_one_visible_gpu_per_process(monkeypatch):
    from gpuload.loader import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # CUDA_VISIBLE_DEVICES narrowed by the launcher
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert default_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert default_device() == torch.device("cuda", 3)


def test_a_ring_refuses_an_unindexed_cuda_device(make_shards):
    stream = TokenStream(make_shards([N]))
    with pytest.raises(ValueError, match="needs its index"):
        Ring(stream, plan_ring(N, 4, T, G, None), "random", 0, torch.device("cuda"), ops=FakeGPU())


def test_next_inside_a_graph_capture_is_refused(two_gpus, make_shards, monkeypatch):
    pytest.importorskip("gpuload._native")
    ld = GPULoader(make_shards([N]), batch_size=G, seq_len=T, device="cuda", backend="native", rank=0, world_size=1)
    monkeypatch.setattr(torch._C, "_cuda_getDevice", lambda: 0, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: True, raising=False)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured .* outside the captured region"):
        next(ld)
    assert ld.step == 0


class FakeDriver:
    """The libcuda functions LibCuda calls: records each call with the device whose context is current."""

    def __init__(self, register_result=0):
        self.calls, self.stack, self.register_result = [], [], register_result

    def _current(self):
        return self.stack[-1] if self.stack else None

    def cuInit(self, flags):
        return 0

    def cuDeviceGet(self, device, index):
        device._obj.value = index
        return 0

    def cuDevicePrimaryCtxRetain(self, context, device):
        context._obj.value = 1000 + device.value
        return 0

    def cuDevicePrimaryCtxRelease_v2(self, device):
        self.calls.append(("release", device.value))
        return 0

    def cuCtxPushCurrent_v2(self, context):
        self.stack.append(context.value - 1000)
        return 0

    def cuCtxPopCurrent_v2(self, context):
        self.stack.pop()
        return 0

    def cuMemHostRegister_v2(self, address, nbytes, flags):
        self.calls.append(("register", address, nbytes, flags, self._current()))
        return self.register_result

    def cuMemHostUnregister(self, address):
        self.calls.append(("unregister", address, self._current()))
        return 0

    def cuStreamCreate(self, stream, flags):
        stream._obj.value = 77
        self.calls.append(("stream", flags, self._current()))
        return 0

    def cuGetErrorName(self, result, name):
        name._obj.value = b"CUDA_ERROR_OUT_OF_MEMORY"
        return 0


@pytest.fixture
def fake_driver(monkeypatch):
    """gpuload.cuda.libcuda() over FakeDriver instead of libcuda.so.1."""
    driver = FakeDriver()
    lib = cuda_module.LibCuda.__new__(cuda_module.LibCuda)
    lib.lib = driver
    monkeypatch.setattr(cuda_module, "libcuda", lambda: lib)
    return driver


@pytest.mark.parametrize("count,dtype", [(1, torch.uint16), (2048, torch.uint16), (2049, torch.uint16),
                                         (1_100_000, torch.uint32)])
def test_pinned_host_registers_exactly_its_pages_in_its_devices_context(fake_driver, count, dtype):
    pinned = PinnedHost(count, dtype, torch.device("cuda", 1))
    nbytes = -(-count * dtype.itemsize // PAGE_BYTES) * PAGE_BYTES
    assert pinned.nbytes == nbytes  # not a power of two: 1.1M uint32 pin 4,400,000 bytes, not 8 MiB
    (kind, address, size, flags, device), released = fake_driver.calls
    assert released == ("release", 1)
    assert (kind, size, device) == ("register", nbytes, 1) and address % PAGE_BYTES == 0
    assert flags == 3  # portable (every context) | device-mapped (kernels read it: zero-copy)
    assert pinned.tensor.dtype == dtype and pinned.tensor.numel() == count and pinned.tensor.data_ptr() == address
    pinned.tensor.fill_(5)
    assert int(pinned.tensor[-1]) == 5
    fake_driver.calls.clear()
    releaser = threading.Thread(target=pinned.release)  # from any thread: still in device 1's context
    releaser.start()
    releaser.join()
    assert fake_driver.calls == [("unregister", address, 1), ("release", 1)] and pinned.tensor is None
    assert fake_driver.stack == []
    pinned.release()  # idempotent
    assert len(fake_driver.calls) == 2


def test_pinned_host_failure_is_a_memory_error_naming_the_driver_error(fake_driver):
    fake_driver.register_result = 2
    with pytest.raises(MemoryError, match="cuMemHostRegister of 4096 bytes .* CUDA_ERROR_OUT_OF_MEMORY \\(2\\)"):
        PinnedHost(10, torch.uint16, torch.device("cuda", 0))
    assert fake_driver.stack == []  # the context was popped on the way out


def test_the_side_stream_is_the_rings_own_non_blocking_stream(fake_driver, monkeypatch):
    made = []
    monkeypatch.setattr(torch.cuda, "ExternalStream", lambda handle, device: made.append((handle, device)) or "s")
    assert CudaOps(torch.device("cuda", 1)).new_stream() == "s"
    assert made == [(77, torch.device("cuda", 1))] and ("stream", 1, 1) in fake_driver.calls  # 1 = non-blocking


def test_cuda_ops_enter_thread_sets_device_stream_and_capture_mode(monkeypatch):
    calls = []

    class Lib:
        def relax_capture_mode(self):
            calls.append(("relaxed",))

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("device", d)))
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: calls.append(("stream", s)))
    monkeypatch.setattr(cuda_module, "libcuda", lambda: Lib())
    CudaOps(torch.device("cuda", 3)).enter_thread("side")
    assert calls == [("device", torch.device("cuda", 3)), ("stream", "side"), ("relaxed",)]
    calls.clear()
    CudaOps(torch.device("cuda", 3)).enter_thread()
    assert calls == [("device", torch.device("cuda", 3)), ("relaxed",)]


# --- the ring's CUDA path against the stand-in -------------------------------------------------------------

def expected_windows(paths, starts):
    tokens = np.concatenate([np.fromfile(p, dtype=np.uint32, offset=1024) for p in paths]).astype(np.int64)
    return torch.from_numpy(tokens[starts.numpy()[:, None] + np.arange(T)])


def drive(ring, gpu, mode, steps, lag, seed=0, streams=None):
    """The loader's use of a ring: acquire, a gather queued on the current stream, release; the "GPU" runs
    the queued gathers only every `lag` steps (or when the ring makes it). With `streams`, the consumer
    switches to the next one every 7 steps. Returns each step's (x, starts)."""
    layout, results = ring.layout, []
    for i, step in enumerate(steps):
        if streams and i % 7 == 0:
            gpu.use_stream(streams[i // 7 % len(streams)])
        tokens = ring.acquire(step)
        try:
            starts, visits = window_starts_and_visits(mode, seed, step, torch.arange(G), G, N, T, layout.chunking)
            positions = ring.ring_positions(starts, visits)
            out = {}

            def gather(tokens=tokens, positions=positions, out=out):
                out["x"] = gather_reference([tokens], torch.tensor([0, tokens.numel()]), positions, T,
                                            torch.int64)[0]

            slots = [] if visits is None else sorted(set((visits % layout.num_slots).tolist()))
            reads = [tokens[k * layout.slot_tokens:(k + 1) * layout.slot_tokens] for k in slots] or [tokens]
            gpu.launch(gather, reads)
            results.append((out, starts))
        finally:
            ring.release(step)
        if len(results) % lag == 0:
            gpu.current_stream().synchronize()
    gpu.synchronize()
    gpu.use_stream(gpu.default_stream)
    return [(out["x"], starts) for out, starts in results]


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
@pytest.mark.parametrize("mode", ["sequential", "shuffle", "random"])
@pytest.mark.parametrize("lag", [1, 5])
def test_chunked_ring_orders_copies_and_gathers(make_shards, placement, mode, lag):
    """Every gather sees its visit's tokens, though the device runs queued work late: copies wait for the
    gathers that read a slot before, gathers wait for the copies, staging buffers are not refilled early."""
    paths = make_shards([N // 2, N // 2])
    gpu = FakeGPU()
    ring = Ring(TokenStream(paths), plan_ring(N, 4, T, G, SMALL_RING), mode, 0, gpu.device, placement, ops=gpu)
    steps = list(range(0, 400)) + [37, 38, 900, 901]  # two epochs of visits, then a jump back and far ahead
    for step, (x, starts) in zip(steps, drive(ring, gpu, mode, steps, lag)):
        assert torch.equal(x, expected_windows(paths, starts)), (placement, mode, step)
    assert gpu.violations == [] and gpu.races == [] and {name for name, _ in gpu.entered} == {"gpuload-ring-fill"}
    assert all(device == gpu.device for _, device in gpu.entered)
    ring.close()
    assert gpu.pending() == 0  # close() waited for every copy and gather queued on the ring's memory
    assert gpu.live_pinned_bytes() == 0 and ring.tokens is None


def test_device_placement_pins_two_staging_pieces_not_the_ring(make_shards):
    paths = make_shards([N])
    gpu = FakeGPU()
    ring = Ring(TokenStream(paths), plan_ring(N, 4, T, G, SMALL_RING), "sequential", 0, gpu.device, "device",
                ops=gpu)
    piece = min(ring.layout.ring_tokens, FILL_PIECE_BYTES // 4)
    assert gpu.pin_requests == [piece * 4, piece * 4] and ring.pinned_bytes() == 2 * -(-piece * 4 // PAGE_BYTES) * PAGE_BYTES
    ring.close()
    assert gpu.live_pinned_bytes() == 0


def test_zero_copy_pins_exactly_the_ring(make_shards):
    gpu = FakeGPU()
    layout = plan_ring(N, 4, T, G, SMALL_RING)
    ring = Ring(TokenStream(make_shards([N])), layout, "random", 0, gpu.device, "zero-copy", ops=gpu)
    assert gpu.pin_requests == [layout.ring_tokens * 4] and ring.device_ring is None
    ring.close()
    assert gpu.live_pinned_bytes() == 0


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
def test_whole_stream_ring(make_shards, placement):
    """The stream on the device for good: its staging buffers are unpinned once the fill is done, and a
    gather needs no wait (the filler waited for its copies before saying the stream is ready)."""
    paths = make_shards([N])
    gpu = FakeGPU()
    ring = Ring(TokenStream(paths), plan_ring(N, 4, T, G, None), "random", 3, gpu.device, placement, ops=gpu)
    results = drive(ring, gpu, "random", range(50), lag=7, seed=3)
    for x, starts in results:
        assert torch.equal(x, expected_windows(paths, starts))
    if placement == "device":
        assert gpu.live_pinned_bytes() == 0 and ring.pinned_bytes() == 0
    else:
        assert gpu.live_pinned_bytes() == ring.pinned_bytes() == -(-N * 4 // PAGE_BYTES) * PAGE_BYTES
    assert gpu.violations == [] and gpu.races == []
    ring.close()
    assert gpu.pending() == 0 and gpu.live_pinned_bytes() == 0


def test_close_waits_for_copies_of_an_interrupted_fill(make_shards, monkeypatch):
    """A fill stopped half way has copies queued on the side stream: close() must not free the ring under them."""
    paths = make_shards([N])
    gpu = FakeGPU()
    ring = Ring(TokenStream(paths), plan_ring(N, 4, T, G, SMALL_RING), "sequential", 0, gpu.device, "device",
                ops=gpu)
    monkeypatch.setattr("gpuload.ring.FILL_PIECE_BYTES", 256)  # several copies per visit
    started = threading.Event()
    real_copy = gpu.copy_async

    def copy_then_signal(dst, src):
        real_copy(dst, src)
        started.set()

    gpu.copy_async = copy_then_signal
    ring._restart(0)
    assert started.wait(10)
    ring.close()
    assert gpu.pending() == 0 and ring.tokens is None and gpu.live_pinned_bytes() == 0


def test_close_waits_for_a_next_in_flight(make_shards):
    """close() from another thread between acquire() and release() frees nothing until the gather is queued."""
    paths = make_shards([N])
    gpu = FakeGPU()
    ring = Ring(TokenStream(paths), plan_ring(N, 4, T, G, None), "random", 0, gpu.device, "zero-copy", ops=gpu)
    tokens = ring.acquire(0)
    closer = threading.Thread(target=ring.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive() and ring.host is not None  # waiting for release()
    gpu.current_stream().enqueue(lambda: tokens.sum())
    ring.release(0)
    closer.join(10)
    assert not closer.is_alive() and ring.host is None and gpu.pending() == 0


def test_a_chunked_ring_refuses_to_be_captured(make_shards):
    gpu = FakeGPU()
    ring = Ring(TokenStream(make_shards([N])), plan_ring(N, 4, T, G, SMALL_RING), "random", 0, gpu.device,
                ops=gpu)
    gpu.capturing_now = True
    with pytest.raises(RuntimeError, match="smaller than the stream was called while a CUDA graph is being captured"):
        ring.acquire(0)
    gpu.capturing_now = False
    ring.acquire(0)  # the refusal left the ring usable
    ring.release(0)
    ring.close()


def test_filler_threads_enter_before_any_cuda_call(make_shards):
    """Each fill thread (one per restart) sets its device first: no CUDA call from a thread that did not."""
    gpu = FakeGPU(index=1)
    ring = Ring(TokenStream(make_shards([N])), plan_ring(N, 4, T, G, SMALL_RING), "shuffle", 0, gpu.device,
                ops=gpu)
    for step in (0, 2000, 3, 5000):  # jumps far past the 4 slots or back: each restarts the filler
        ring.acquire(step)
        ring.release(step)
    ring.close()
    assert gpu.violations == [] and len(gpu.entered) >= 4
    assert all(entry == ("gpuload-ring-fill", torch.device("cuda", 1)) for entry in gpu.entered)


def test_a_second_reader_is_refused_not_blocked(make_shards):
    ring = Ring(TokenStream(make_shards([N])), plan_ring(N, 4, T, G, None), "random", 0, torch.device("cpu"))
    ring.acquire(0)
    with pytest.raises(RuntimeError, match=r"already being read: acquire\(\) was not followed by release\(\), or two"):
        ring.acquire(1)
    ring.release(0)
    ring.acquire(1)
    ring.release(1)
    ring.close()


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
def test_a_consumer_that_changes_streams_keeps_its_batches(make_shards, placement):
    """Gathers queued on a stream the loop left are waited for before their slots are refilled."""
    paths = make_shards([N])
    gpu = FakeGPU()
    ring = Ring(TokenStream(paths), plan_ring(N, 4, T, G, SMALL_RING), "sequential", 0, gpu.device, placement,
                ops=gpu)
    streams = [gpu.new_stream() for _ in range(3)]
    steps = list(range(300))
    for step, (x, starts) in zip(steps, drive(ring, gpu, "sequential", steps, lag=50, streams=streams)):
        assert torch.equal(x, expected_windows(paths, starts)), step
    assert gpu.races == []
    ring.close()
    assert gpu.pending() == 0 and gpu.live_pinned_bytes() == 0


def test_a_close_that_times_out_frees_the_ring_when_next_returns(make_shards, monkeypatch):
    monkeypatch.setattr("gpuload.ring.CLOSE_WAIT_S", 0.2)
    gpu = FakeGPU()
    ring = Ring(TokenStream(make_shards([N])), plan_ring(N, 4, T, G, None), "random", 0, gpu.device, "zero-copy",
                ops=gpu)
    tokens = ring.acquire(0)
    with pytest.warns(RuntimeWarning, match="freed when it returns"):
        closer = threading.Thread(target=ring.close)
        closer.start()
        closer.join(10)
    assert ring.host is not None  # not freed under the reader
    gpu.current_stream().enqueue(lambda: tokens.sum())
    ring.release(0)
    assert ring.host is None and gpu.pending() == 0 and gpu.live_pinned_bytes() == 0


def test_a_ring_collected_during_a_capture_is_freed_after_it(make_shards):
    import gc

    from gpuload import ring as ring_module

    gpu = FakeGPU()
    ring = Ring(TokenStream(make_shards([N])), plan_ring(N, 4, T, G, None), "random", 0, gpu.device, "zero-copy",
                ops=gpu)
    ring.acquire(0)
    ring.release(0)
    gpu.capturing_now = True
    del ring
    gc.collect()
    assert gpu.live_pinned_bytes() > 0 and len(ring_module._leftovers) == 1  # no synchronize inside the capture
    gpu.capturing_now = False
    ring_module._free_leftovers()
    assert gpu.live_pinned_bytes() == 0 and ring_module._leftovers == []


@pytest.mark.parametrize("placement", ["device", "zero-copy"])
def test_refills_after_a_jump_or_a_new_seed_wait_for_the_queued_gathers(make_shards, placement):
    """A restart reloads slots that gathers still queued may read (a step back into the same visits, or a
    resume with another seed at the same step): it must wait for all of them."""
    paths = make_shards([N])
    gpu = FakeGPU()
    ring = Ring(TokenStream(paths), plan_ring(N, 4, T, G, SMALL_RING), "shuffle", 0, gpu.device, placement, ops=gpu)
    steps = [60, 61, 62, 31, 32, 33]  # visit 1 (steps 32-63); step 31 starts in visit 0: a restart at visit 0
    results = drive(ring, gpu, "shuffle", steps, lag=100)
    for step, (x, starts) in zip(steps, results):
        assert torch.equal(x, expected_windows(paths, starts)), step
    ring.reset(5)  # another seed, same steps: every slot reloads with other chunks
    results = drive(ring, gpu, "shuffle", [33, 34, 35], lag=100, seed=5)
    for step, (x, starts) in zip([33, 34, 35], results):
        assert torch.equal(x, expected_windows(paths, starts)), step
    assert gpu.races == []
    ring.close()
