"""The peer providers of `gpuload bench` (litdata, mosaicml-streaming, torchdata, Grain, HF datasets): each in
smoke mode when installed (skipped with the reason otherwise), their converted copies, and the batch check."""

import multiprocessing
import sys

import numpy as np
import pytest
import torch

import gpuload.bench.runner as runner
from gpuload.bench.peers import PEERS, convert_once, stream_blocks
from gpuload.bench.providers import PEER_NAMES, make_provider, unavailable
from gpuload.bench.runner import measure
from gpuload.shards import open_shard

CPU = torch.device("cpu")
SIZES = [3000, 5000, 4000]  # 12,000 position tokens: exact in uint16, the peers' usual token width
B, T = 4, 16


def installed(name):
    """pytest.param(name), skipped with the reason when the peer cannot be imported here."""
    reason = unavailable(name, CPU)
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""))


PEERS_HERE = [installed(name) for name in PEER_NAMES]


@pytest.fixture
def shards(make_shards):
    return [open_shard(p) for p in make_shards(SIZES, dtype=np.uint16)]


@pytest.mark.parametrize("name", PEERS_HERE)
def test_peer_batches_are_windows_of_the_stream(shards, tmp_path, name):
    """Token = stream position: y == x + 1, each row counts up by one, rows are not one repeated window, and
    the peers that store fixed blocks of T+1 tokens read whole blocks."""
    provider = make_provider(name, shards, B, T, CPU, cache_dir=str(tmp_path))
    try:
        batches = [provider() for _ in range(6)]
    finally:
        provider.close()
    starts = []
    for x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and x.device == CPU
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(T))
        assert 0 <= int(x.min()) and int(y.max()) < sum(SIZES)
        starts.append(x[:, 0])
    starts = torch.cat(starts)
    assert len(set(starts.tolist())) > B
    if name == "mosaic-streaming":  # blocks of the concatenated stream
        assert provider.sampling == "shuffled blocks" and bool((starts % (T + 1) == 0).all())
    if name == "hf-datasets":  # from_generator runs the generator once per file of its list: blocks of each shard
        shard_start = torch.tensor(np.cumsum([0] + SIZES[:-1]))[torch.bucketize(starts, torch.tensor(
            np.cumsum(SIZES[:-1])), right=True)]
        assert provider.sampling == "shuffled blocks" and bool(((starts - shard_start) % (T + 1) == 0).all())
    if PEERS[name].convert(shards, T, str(tmp_path)) is not None:
        assert provider.conversion is not None and not provider.conversion.reused


@pytest.mark.parametrize("name", PEERS_HERE)
def test_peer_smoke_row(shards, tmp_path, name):
    """measure(): interleaved rounds, the conversion once (then reused), first batch and memory columns."""
    first = measure(name, shards, B, T, steps=4, warmup=1, device=CPU, label="test", rounds=2,
                    cache_dir=str(tmp_path))
    again = measure(name, shards, B, T, steps=2, warmup=0, device=CPU, label="test", rounds=1,
                    cache_dir=str(tmp_path))
    for row in (first, again):
        assert row["provider"] == name and len(row["batch_us"]) == row["steps"] and row["tokens_per_s"] > 0
        assert row["first_batch_s"] > 0 and row["peak_pss_mib"] is not None and row["helper_processes"] >= 1
    if first["conversion_s"] is not None:
        assert not first["conversion_reused"] and again["conversion_reused"]
        assert again["conversion_s"] == first["conversion_s"]
    assert first["sampling"] in ("random", "shuffled blocks")


@pytest.mark.parametrize("wrong", ["swapped", "narrow"])
@pytest.mark.parametrize("name", PEERS_HERE)
def test_a_peer_that_returns_a_wrong_batch_fails_its_check(shards, tmp_path, monkeypatch, name, wrong):
    peer = PEERS[name]

    class Wrong(peer):
        def __call__(self):
            x, y = super().__call__()
            return (y, x) if wrong == "swapped" else (x.to(torch.int32), y)

    monkeypatch.setattr(runner, "make_provider", lambda n, *args, **kwargs: Wrong(*args, **kwargs))
    message = "y is not x shifted by one token" if wrong == "swapped" else "x is .* torch.int32"
    with pytest.raises(RuntimeError, match=f"provider {name}: {message}"):
        measure(name, shards, B, T, steps=2, warmup=0, device=CPU, label="test", cache_dir=str(tmp_path))


@pytest.mark.parametrize("name", PEER_NAMES)
def test_a_peer_that_cannot_be_imported_is_skipped_with_the_reason(monkeypatch, name):
    monkeypatch.setitem(sys.modules, PEERS[name].module, None)  # import then raises ImportError
    reason = unavailable(name, CPU)
    assert reason.startswith(f"import {PEERS[name].module} failed (ModuleNotFoundError: ")
    assert reason.endswith(PEERS[name].install) and "pip install" in reason
    names, skipped = runner.choose_providers(None, CPU)
    assert name not in names and {"provider": name, "reason": reason} in skipped


def test_conversion_is_reused_until_the_shards_change(shards, tmp_path):
    calls = []

    def convert(directory):
        calls.append(directory)

    first = convert_once("torchdata", shards, T, str(tmp_path), convert)
    again = convert_once("torchdata", shards, T, str(tmp_path), convert)
    assert len(calls) == 1 and not first.reused and again.reused and again.seconds == first.seconds
    assert convert_once("torchdata", shards, T + 1, str(tmp_path), convert).reused is False  # another T
    with open(shards[0].path, "r+b") as f:  # same size, later mtime: converted again
        f.seek(-2, 2)
        f.write(b"\x00\x00")
    assert not convert_once("torchdata", [open_shard(s.path) for s in shards], T, str(tmp_path), convert).reused
    assert len(calls) == 3


def test_converter_output_goes_to_stderr(shards, tmp_path, capfd):
    convert_once("torchdata", shards, T, str(tmp_path), lambda directory: print("converter progress"))
    out, err = capfd.readouterr()
    assert "converter progress" in err and "converter progress" not in out


def test_stream_blocks_are_the_stream_in_order(shards):
    blocks = list(stream_blocks([s.path for s in shards], np.uint16, T + 1))
    assert len(blocks) == sum(SIZES) // (T + 1)
    assert np.array_equal(np.concatenate(blocks), np.arange(len(blocks) * (T + 1)))


@pytest.mark.skipif(unavailable("litdata", CPU) is not None, reason=str(unavailable("litdata", CPU)))
def test_litdata_conversion_leaves_the_start_method_alone(shards, tmp_path):
    """litdata's optimize forces spawn for the whole process; every later DataLoader would spawn its workers."""
    before = multiprocessing.get_start_method(allow_none=True)
    PEERS["litdata"].convert(shards, T, str(tmp_path))
    assert multiprocessing.get_start_method(allow_none=True) == before
