"""`gpuload bench`: the command end to end on the CPU, each provider's batches, the demo dataset cache, errors."""

import json
import os

import numpy as np
import pytest
import torch

from gpuload.bench.dataset import MARKER, default_cache_dir, demo_dataset
from gpuload.bench.providers import PEER_NAMES, PROVIDER_NAMES, Provider, make_provider, unavailable
from gpuload.bench.runner import measure
from gpuload.cli import main
from gpuload.shards import TokenStream, open_shard

CPU = torch.device("cpu")
# The hand-copied loaders and gpuload's backends that run here; the peers are tested in test_bench_peers.py.
CPU_PROVIDERS = [name for name in PROVIDER_NAMES if name not in PEER_NAMES and not unavailable(name, CPU)]


def test_bench_quick_end_to_end(tmp_path, capsys):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--quick", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json", str(out),
            "--plot", str(png)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "vs nanogpt" in stdout and "skipped gpuload-cuda-triton-ring" in stdout
    assert "GPU: none" in stdout or torch.cuda.is_available()

    result = json.loads(out.read_text())
    assert result["command"] == "gpuload " + " ".join(argv)
    shapes = [(b, t) for b in result["settings"]["batch_sizes"] for t in result["settings"]["seq_lens"]]
    assert len(shapes) >= 2
    assert [(r["provider"], r["batch_size"], r["seq_len"]) for r in result["rows"]] == \
           [(name, b, t) for b, t in shapes for name in CPU_PROVIDERS]
    assert {s["provider"] for s in result["skipped"]} == set(PROVIDER_NAMES) - set(CPU_PROVIDERS)
    assert {s["provider"] for s in result["skipped"] if "off with --quick" in s["reason"]} == set(PEER_NAMES)
    assert result["settings"]["rounds"] == 2
    for r in result["rows"]:
        assert 0 < r["p10_us"] <= r["median_us"] <= r["p90_us"]
        assert r["tokens_per_s"] > 0 and r["host_cpu_us"] > 0 and r["speedup_vs_nanogpt"] > 0
        assert len(r["batch_us"]) == r["steps"] == result["settings"]["steps"]
        assert r["provider"] != "nanogpt" or r["speedup_vs_nanogpt"] == 1.0
        assert r["conversion_s"] is None and 0 < r["first_batch_s"] < 60 and r["rounds"] == 2
        assert r["peak_rss_mib"] is not None and r["peak_pss_mib"] is not None  # Linux: /proc is there
    workers = {r["provider"]: r["helper_processes"] for r in result["rows"]}
    assert workers["torch-dataloader"] >= 1 and workers["nanogpt"] == 0
    assert result["machine"]["cores"] >= 1 and result["dataset"]["num_tokens"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


@pytest.mark.parametrize("name", CPU_PROVIDERS)
def test_provider_batches_are_windows_of_the_stream(make_shards, name):
    """Token = stream position, so y == x + 1 and each row counts up by one from its window start."""
    sizes = [3000, 5000, 4000]
    B, T = 4, 16
    provider = make_provider(name, [open_shard(p) for p in make_shards(sizes)], B, T, CPU)
    try:
        batches = [provider() for _ in range(6)]
    finally:
        provider.close()
    starts = []
    for x, y in batches:
        assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.int64 and x.device == CPU
        assert torch.equal(y, x + 1)
        assert torch.equal(x, x[:, :1] + torch.arange(T))
        assert 0 <= int(x.min()) and int(y.max()) < sum(sizes)
        starts.append(x[:, 0])
    starts = torch.stack(starts)
    if name == "nanogpt":  # nanoGPT reads one file: the first shard
        assert int(starts.max()) + T < sizes[0]
    if name == "torch-dataloader":  # windows of one shard each: none crosses a shard boundary
        for boundary in np.cumsum(sizes)[:-1]:
            assert not ((starts < boundary) & (starts + T >= boundary)).any()
    if name == "nanochat-seq":  # the stream in order: rows, then batches, follow each other within a shard
        assert starts.flatten().tolist()[:8] == [i * T for i in range(8)]
    else:
        assert len(set(starts.flatten().tolist())) > B  # random windows, not one repeated batch


def test_dataloader_workers_are_shut_down(make_shards):
    provider = make_provider("torch-dataloader", [open_shard(p) for p in make_shards([5000])], 2, 8, CPU)
    provider()
    workers = list(provider.iterator._workers)
    assert workers and all(w.is_alive() for w in workers)
    provider.close()
    assert not any(w.is_alive() for w in workers)


def test_demo_dataset_is_reused_and_validated(tmp_path, capsys):
    first = demo_dataset(str(tmp_path), quick=True, quiet=True)
    assert not first.reused and len(first.paths) >= 2
    assert TokenStream(first.paths).num_tokens == first.num_tokens
    mtimes = [os.path.getmtime(p) for p in first.paths]
    again = demo_dataset(str(tmp_path), quick=True)
    assert again.reused and again.paths == first.paths and [os.path.getmtime(p) for p in again.paths] == mtimes
    assert capsys.readouterr().err == ""

    victim = first.paths[1]
    with open(victim, "r+b") as f:  # truncated: the header no longer matches the size
        f.truncate(os.path.getsize(victim) - 2)
    assert not demo_dataset(str(tmp_path), quick=True).reused
    assert "truncated" in capsys.readouterr().err and open_shard(victim).num_tokens == first.num_tokens // 2

    with open(victim, "r+b") as f:  # same size, other tokens
        f.seek(1024)
        f.write(b"\xff\xff")
    assert not demo_dataset(str(tmp_path), quick=True).reused
    assert "contents changed" in capsys.readouterr().err

    marker = tmp_path / "bench-demo-quick" / MARKER
    marker.write_text(marker.read_text().replace('"shard_tokens": ', '"shard_tokens": 1'))
    assert not demo_dataset(str(tmp_path), quick=True).reused
    assert "another dataset" in capsys.readouterr().err
    assert demo_dataset(str(tmp_path), quick=True).reused


def test_default_cache_dir_follows_xdg(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == os.path.join(str(tmp_path), "gpuload")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # the XDG spec says to ignore relative paths
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "gpuload")


def test_arguments_reach_run_bench(monkeypatch):
    import gpuload.bench.runner as runner

    calls = []
    monkeypatch.setattr(runner, "run_bench", lambda **kwargs: calls.append(kwargs))
    assert main(["bench", "--batch-size", "4,8", "--batch-size", "8,16", "--seq-len", "64", "--steps", "7",
                 "--providers", "nanogpt", "--providers", "gpuload-cpu-torch,nanogpt", "--device", "cpu",
                 "--rounds", "3"]) == 0
    assert main(["bench"]) == 0
    got = calls[0]
    assert got["batch_sizes"] == [4, 8, 16] and got["seq_lens"] == [64] and got["steps"] == 7 and got["rounds"] == 3
    assert got["providers"] == ["nanogpt", "gpuload-cpu-torch"] and got["device"] == "cpu"
    assert calls[1]["batch_sizes"] is None and calls[1]["providers"] is None and not calls[1]["quick"]
    assert calls[1]["rounds"] is None


@pytest.mark.parametrize("args, message", [
    (["--providers", "nosuch"], "unknown provider 'nosuch'"),
    (["--providers", "gpuload-cuda-triton-ring", "--device", "cpu"], "gpuload-cuda-triton-ring cannot run on cpu"),
    (["--device", "tpu"], "expected cpu, cuda or cuda:N"),
    (["--json", "{tmp}/nodir/r.json"], "does not exist"),
    (["--plot", "{tmp}/chart.jpg"], "expected a path ending in .png"),
    (["--data", "{tmp}/missing/*.bin"], "no files match"),
    (["--data", "{tmp}/shards", "--seq-len", "5000", "--quick"], "in the first shard"),
    (["--data", "{tmp}/mixed"], "holds both training"),
])
def test_user_errors_are_one_line(tmp_path, capsys, args, message):
    os.makedirs(tmp_path / "shards")
    np.save(tmp_path / "shards" / "a.npy", np.arange(4000, dtype=np.uint16))
    os.makedirs(tmp_path / "mixed")
    for name in ("train_0.npy", "val_0.npy"):
        np.save(tmp_path / "mixed" / name, np.arange(100, dtype=np.uint16))
    argv = ["bench", "--cache-dir", str(tmp_path / "cache")] + [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpuload: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1
    assert not (tmp_path / "cache").exists()  # refused before writing the demo dataset


def test_bad_option_values_exit_2(capsys):
    assert main(["bench", "--batch-size", "8,0"]) == 2
    assert "expected a whole number of 1 or more, found '0'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_cuda_is_a_user_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "CUDA is not available here" in capsys.readouterr().err


def test_plot_without_matplotlib_is_a_user_error(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec then reports it missing
    assert main(["bench", "--plot", str(tmp_path / "c.png"), "--cache-dir", str(tmp_path)]) == 2
    assert "pip install 'gpuload[plot]'" in capsys.readouterr().err


def test_a_provider_that_breaks_the_contract_is_caught(make_shards, monkeypatch):
    import gpuload.bench.runner as runner

    class Unshifted(Provider):
        name = "unshifted"

        def __call__(self):
            x = torch.arange(8, dtype=torch.int64).view(2, 4)
            return x, x.clone()

    monkeypatch.setattr(runner, "make_provider", lambda *args, **kwargs: Unshifted())
    with pytest.raises(RuntimeError, match="unshifted: y is not x shifted by one token"):
        measure("unshifted", [], 2, 4, steps=2, warmup=0, device=CPU, label="test")


def test_rounds_interleave_the_providers(make_shards, monkeypatch):
    """Each round times every provider in turn: the calls alternate, a block of steps // rounds each."""
    import gpuload.bench.runner as runner

    calls = []

    class Counting(Provider):
        def __init__(self, name):
            self.name = name

        def __call__(self):
            calls.append(self.name)
            x = torch.arange(9, dtype=torch.int64).repeat(2, 1)
            return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    monkeypatch.setattr(runner, "make_provider", lambda name, *args, **kwargs: Counting(name))
    rows = runner.measure_group(["a", "b"], [], 2, 8, steps=6, warmup=1, device=CPU, label="test", rounds=3)
    timed = calls[4:]  # after each one's first batch and warm-up batch
    assert calls[:4] == ["a", "b", "a", "b"]
    assert timed == ["a", "a", "b", "b"] * 3
    assert [r["steps"] for r in rows] == [6, 6] and all(len(r["batch_us"]) == 6 for r in rows)


def test_steps_fewer_than_rounds_is_a_user_error(make_shards):
    from gpuload.bench import BenchError
    from gpuload.bench.runner import measure_group

    with pytest.raises(BenchError, match="at least one step per round"):
        measure_group(["nanogpt"], [], 2, 8, steps=2, warmup=0, device=CPU, label="test", rounds=3)
