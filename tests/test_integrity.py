"""Nothing silently wrong: shards that change under a run, thousands of shards, and input that is not what it
claims to be. Every CPU backend, through whole and chunked rings; the expected batch is computable because
token = stream position (tests/conftest.py)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from gpuload import GPULoader, native
from gpuload.kernels import triton_gather
from gpuload.shards import ShardChanged, ShardError, TokenStream, open_shard, write_shard

# Triton through its CPU interpreter here (tests/conftest.py), compiled on a GPU.
RING_BACKENDS = ["torch"] + (["triton"] if triton_gather.interpreter_active() or torch.cuda.is_available() else [])
NATIVE = pytest.mark.skipif(not native.available(), reason="native extension not built")
T = 16
SHARD = 4096


def make_old_shards(make_shards, count, dtype=np.uint32):
    """Position-token shards whose mtime lies in the past: a change made now always moves it (the clock that
    stamps writes ticks every few ms, so a write right after the shard's own would keep its mtime)."""
    paths = make_shards([SHARD] * count, dtype=dtype)
    for path in paths:
        os.utime(path, ns=(10**18, 10**18))
    return paths


def expected(ld, step):
    """The batch of `step` from the contract and token = position (uint32 shards)."""
    starts = ld.window_starts(step)
    windows = starts[:, None] + torch.arange(T + 1)
    return windows[:, :-1], windows[:, 1:]


def rewrite_in_place(path, token_index, value):
    """Overwrite one token of an llm.c shard where it lies (same inode, same size), as `cp` or an editor would."""
    with open(path, "r+b") as f:
        f.seek(1024 + 4 * token_index)
        f.write(np.array([value], dtype=np.uint32).tobytes())


def loader(paths, backend, **kw):
    on_gpu = backend == "triton" and not triton_gather.interpreter_active()
    return GPULoader(paths, batch_size=1, seq_len=T, sampling="sequential", rank=0, world_size=1,
                     device="cuda" if on_gpu else "cpu", backend=backend, **kw)


# --- A shard changed under a ring: refused at the fill, before any batch holds a changed token.

@pytest.mark.parametrize("backend", RING_BACKENDS)
@pytest.mark.parametrize("change", ["truncate", "rewrite", "grow"])
def test_ring_refuses_a_shard_changed_after_opening(make_shards, backend, change):
    paths = make_old_shards(make_shards, 16)
    # 4 slots of 1024 tokens: the filler loads at most 4 chunks of 64 ahead, so the last shard is read late.
    ld = loader(paths, backend, ring_tokens=4096)
    next(ld)
    victim = paths[-1]
    if change == "truncate":
        os.truncate(victim, 1024 + 4 * 100)
    elif change == "rewrite":
        rewrite_in_place(victim, 2000, 7)
    else:
        with open(victim, "ab") as f:
            f.write(b"\0" * 8)
    state = ld.state_dict()
    state["step"] = 15 * SHARD // T - 300  # 300 steps before the last shard: visits load ahead of the reads
    ld.load_state_dict(state)
    with pytest.raises(ShardChanged) as info:
        for step in range(state["step"], 16 * SHARD // T):
            x, y = (t.cpu() for t in next(ld))
            want_x, want_y = expected(ld, step)
            assert torch.equal(x, want_x) and torch.equal(y, want_y), step  # never a changed token
    message = str(info.value)
    assert victim in message and "no batch holds them" in message
    assert {"truncate": "truncated from", "rewrite": "modified", "grow": "grown from"}[change] in message
    assert f"step {ld.step}" in message  # the step that needed them: resume there once the shard is restored
    ld.close()


@pytest.mark.parametrize("backend", RING_BACKENDS)
def test_ring_fill_across_a_truncated_shards_lost_pages_is_a_changed_shard(make_shards, backend):
    """A fill read past the new end of file meets unmapped pages (SIGBUS in the native copy): still ShardChanged,
    with the ring's word that no batch holds the tokens, not a bare fault."""
    paths = make_shards([600_000, 600_000])
    ld = loader(paths, backend, ring_tokens=400_000)
    next(ld)
    os.truncate(paths[1], 1024 + 4 * 1000)
    ld.load_state_dict({**ld.state_dict(), "step": 1_000_000 // T})
    with pytest.raises(ShardChanged, match=r"shard_1.bin: truncated from 2401024 to 5024 bytes.*no batch holds them"):
        next(ld)
    ld.close()


@pytest.mark.parametrize("backend", RING_BACKENDS + (["native"] if native.available() else []))
@pytest.mark.parametrize("ring_tokens", [None, 4096])
def test_shard_replaced_by_rename_before_its_first_read_keeps_its_content(make_shards, backend, ring_tokens):
    """os.replace (write_shard, prepare --overwrite) puts a new file under the name; the loader opened the old one."""
    paths = make_old_shards(make_shards, 16)
    ld = loader(paths, backend, ring_tokens=ring_tokens) if backend != "native" else loader(paths, backend)
    write_shard(paths[-1], np.zeros(SHARD, np.uint32))  # the name now holds zeros
    os.remove(paths[-2])
    state = ld.state_dict()
    state["step"] = 14 * SHARD // T  # the two last shards
    ld.load_state_dict(state)
    for step in range(state["step"], state["step"] + 2 * SHARD // T - 1):
        x, y = (t.cpu() for t in next(ld))
        want_x, want_y = expected(ld, step)
        assert torch.equal(x, want_x) and torch.equal(y, want_y), step
    ld.close()


# --- The native backend reads the maps at every step: its watch reports a change within a bounded number of steps.

@NATIVE
def test_native_truncation_in_the_last_page_is_reported(make_shards):
    """The issue's case: a cut in the last page reads as zeros through the map, and no SIGBUS ever comes."""
    path = make_shards([10_000], dtype=np.uint16)[0]
    os.utime(path, ns=(10**18, 10**18))
    ld = GPULoader(path, batch_size=1, seq_len=T, sampling="sequential", rank=0, world_size=1, device="cpu",
                   backend="native")
    bound = ld.sources[0].stream.table.max_unverified
    next(ld)
    os.truncate(path, 1024 + 9960 * 2)
    state = ld.state_dict()
    state["step"] = 623  # tokens 9968..9984, past the cut
    ld.load_state_dict(state)
    with pytest.raises(ShardChanged) as info:
        for _ in range(bound + 1):
            next(ld)
    message = str(info.value)
    assert path in message and "truncated from 21024 to 20944 bytes" in message
    # The step named is the first read after the last clean check: 623 at the latest, as here step 0 was read
    # before the cut and may have been unverified.
    assert "batches from step 623 on" in message or "batches from step 0 on" in message, message


@NATIVE
@pytest.mark.parametrize("mixed", [False, True])
def test_native_rewrite_in_place_is_reported_with_its_first_step(make_shards, tmp_path, mixed):
    paths = make_old_shards(make_shards, 8)
    files = {"a": paths[:4], "b": paths[4:]} if mixed else paths
    ld = GPULoader(files, batch_size=2, seq_len=T, sampling="sequential", rank=0, world_size=1, device="cpu",
                   backend="native", weights={"a": 1, "b": 1} if mixed else None)
    bound = max(source.stream.table.max_unverified for source in ld.sources)
    read = []  # (step, batch) in read order
    for _ in range(5):
        read.append((ld.step, next(ld)))
    for path in paths:
        rewrite_in_place(path, 5, 123_456_789)  # every shard, so the next batches surely read a changed token
    first_changed = None
    with pytest.raises(ShardChanged) as info:
        for _ in range(bound + 2):
            step = ld.step
            batch = next(ld)
            read.append((step, batch))
            if first_changed is None and int(batch[0].max()) == 123_456_789:
                first_changed = step
    message = str(info.value)
    assert "modified (its mtime changed) after the loader opened it" in message
    named = int(message.split("batches from step ")[1].split(" ")[0]) if "batches from step" in message else None
    order = [step for step, _ in read]
    # No batch before the named step (in read order) read a changed token; at most `bound` came after it.
    assert named is not None and named in order, message
    if first_changed is not None:
        assert order.index(named) <= order.index(first_changed)
    assert len(order) - order.index(named) <= bound + 1


@NATIVE
def test_native_watch_lets_an_unchanged_run_go_and_stops_with_its_loader(make_shards):
    paths = make_old_shards(make_shards, 4)
    threads = len(os.listdir("/proc/self/task"))
    for _ in range(3):
        ld = loader(paths, "native")
        bound = ld.sources[0].stream.table.max_unverified
        for _ in range(3 * bound):  # past the bound three times: each wait ends with a clean check
            next(ld)
        ld.close()
        del ld
    assert len(os.listdir("/proc/self/task")) == threads  # each watch thread joined with its table


@NATIVE
def test_native_watch_check_compares_every_shard(make_shards):
    paths = make_old_shards(make_shards, 3)
    stream = TokenStream(paths)
    assert stream.table.check() == ""
    rewrite_in_place(paths[1], 0, 1)
    assert stream.table.check() == f"{paths[1]}: modified (its mtime changed)"


@pytest.mark.parametrize("backend", RING_BACKENDS + (["native"] if native.available() else []))
def test_a_shard_edited_in_place_then_replaced_is_still_caught(make_shards, backend):
    """A few shards keep their descriptors, and the checks follow the opened file: `cp wrong.bin shard.bin`
    (an edit of the mapped inode), then a fix renamed over the name, does not hide the edit."""
    paths = make_old_shards(make_shards, 4)
    ld = loader(paths, backend, ring_tokens=4096) if backend != "native" else loader(paths, backend)
    rewrite_in_place(paths[2], 10, 7)
    write_shard(paths[2], np.zeros(SHARD, np.uint32))  # the "fix", by rename: the loader's map keeps the edit
    ld.load_state_dict({**ld.state_dict(), "step": 2 * SHARD // T})
    with pytest.raises(ShardChanged, match="shard_2.bin: modified"):
        for _ in range(ld.sources[0].stream.table.max_unverified + 2 if backend == "native" else 3):
            next(ld)
    ld.close()


# --- Thousands of shards: no descriptor per shard.

def run_python(code, env=None):
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, env={**os.environ, **(env or {})})
    return result


@NATIVE
def test_ten_thousand_shards_under_a_1024_descriptor_limit(tmp_path):
    directory = tmp_path / "many"
    directory.mkdir()
    for i in range(10_000):
        write_shard(directory / f"train_{i:05d}.bin", np.full(40, i, np.uint16))
    code = f"""
        import resource, torch
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        from gpuload import GPULoader
        for kw in (dict(backend="native"), dict(backend="torch"), dict(backend="torch", ring_tokens=16384)):
            ld = GPULoader({str(directory)!r}, batch_size=4, seq_len=8, sampling="sequential", rank=0, world_size=1,
                           device="cpu", **kw)
            for step in range(0, 10_000 * 40 // 32 - 1, 97):
                ld.load_state_dict({{**ld.state_dict(), "step": step}})
                x, y = next(ld)
                starts = ld.window_starts(step)
                assert torch.equal(x[:, 0], starts // 40), (kw, step)
            ld.close()
        print("ok")
    """
    result = run_python(code)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]
    # Without the native extension the reads pread through one descriptor per shard: a clear error, not a bare EMFILE.
    result = run_python(code, env={"GPULOAD_NO_NATIVE": "1"})
    assert result.returncode != 0
    assert "too many open files in this process (limit 1024, hard limit 1024" in result.stderr, result.stderr[-3000:]
    assert "Ask for a higher hard limit (ulimit -Hn" in result.stderr and "train_" in result.stderr


# --- Input that is not what it claims to be.

def test_npy_named_bin_is_refused(tmp_path):
    path = tmp_path / "train.bin"
    with open(path, "wb") as f:
        np.save(f, np.arange(1000, dtype=np.uint16))
    with pytest.raises(ShardError, match=r"train.bin: this is a .npy file .* Rename it to .npy"):
        open_shard(str(path))


@pytest.mark.parametrize("width", [2, 4])
def test_llmc_header_with_an_unknown_magic_is_refused(tmp_path, width):
    path = tmp_path / "train.bin"
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240521, 1, 500
    path.write_bytes(header.tobytes() + np.arange(500, dtype=f"<u{width}").tobytes())
    with pytest.raises(ShardError, match=r"starts like an llm.c shard header \(magic 20240521, version 1, 500 tokens"):
        open_shard(str(path))
    path.write_bytes(header.tobytes() + np.arange(501, dtype="<u2").tobytes())  # count not matching: raw tokens
    assert open_shard(str(path)).format == "raw"


def test_negative_ids_in_an_int32_npy_are_refused(tmp_path):
    tokens = np.arange(1000, dtype=np.int32)
    tokens[777] = -1
    write_shard(tmp_path / "train.npy", tokens, format="npy")
    with pytest.raises(ShardError, match=r"train.npy: token ids must be non-negative, found -1 at token 777"):
        TokenStream(str(tmp_path / "train.npy"))


@pytest.mark.parametrize("backend", ["torch"] + (["native"] if native.available() else []))
def test_int32_inputs_refuse_ids_they_cannot_hold(tmp_path, backend):
    tokens = np.arange(1000, dtype=np.uint32)
    write_shard(tmp_path / "train.bin", tokens)
    kw = dict(batch_size=2, seq_len=8, device="cpu", rank=0, world_size=1, backend=backend, input_dtype=torch.int32)
    next(GPULoader(str(tmp_path / "train.bin"), **kw))  # small ids: fine
    tokens[500] = 2**31
    write_shard(tmp_path / "train.bin", tokens)
    with pytest.raises(ValueError, match=r"token 500 is 2147483648, which input_dtype=torch.int32 cannot hold"):
        GPULoader(str(tmp_path / "train.bin"), **kw)
    x, y = next(GPULoader(str(tmp_path / "train.bin"), **{**kw, "input_dtype": torch.int64}))
    assert x.dtype == torch.int64


def test_non_utf8_shard_names(tmp_path):
    name = os.fsdecode(b"train_\xff.bin")
    write_shard(os.path.join(tmp_path, name), np.arange(100, dtype=np.uint16))
    for backend in ["torch"] + (["native"] if native.available() else []):
        ld = GPULoader(str(tmp_path), batch_size=1, seq_len=8, device="cpu", rank=0, world_size=1, backend=backend)
        assert ld.state_dict()["sources"][0]["dataset"]  # the fingerprint hashes the name's bytes
        next(ld)


def test_paths_that_are_not_files_say_what_they_are(tmp_path):
    fifo = tmp_path / "fifo.bin"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.bin"
    os.symlink(loop, loop)
    dangling = tmp_path / "dangling.bin"
    os.symlink(tmp_path / "gone.bin", dangling)
    cases = [(fifo, ShardError, "is a FIFO"), (loop, FileNotFoundError, "is a symlink loop"),
             (dangling, FileNotFoundError, "is a dangling symlink to .*gone.bin")]
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            TokenStream(str(path))
        with pytest.raises(error, match=message.split(" to ")[0]):  # among a directory's shards: never dropped silently
            other = tmp_path / "d"
            other.mkdir(exist_ok=True)
            write_shard(other / "train_0.bin", np.arange(100, dtype=np.uint16))
            link = other / f"train_1_{path.name}"
            if not os.path.lexists(link):
                os.symlink(path, link)
            TokenStream(str(other))
        os.remove(other / f"train_1_{path.name}")


@pytest.mark.parametrize("files", [None, 3, 2.5, [None], [b"x", 7]])
def test_files_of_the_wrong_type_are_a_value_error(files):
    with pytest.raises(ValueError, match="files must be a path, a glob, a directory or a list of these"):
        TokenStream(files)


def test_bytes_paths_are_paths(tmp_path):
    write_shard(tmp_path / "train.bin", np.arange(100, dtype=np.uint16))
    assert TokenStream(os.fsencode(tmp_path / "train.bin")).num_tokens == 100
