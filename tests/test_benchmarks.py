"""Every benchmark also runs in its tiny smoke mode here, so none of them can rot."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

BENCH_DIR = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_cpu_gather_quick(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = load_benchmark("bench_cpu_gather").main(["--quick", "--json", str(out)])
    providers = [row["provider"] for row in result["rows"]]
    assert providers[:2] == ["nanogpt", "gpuload-torch"]
    assert "gpuload-torch-aligned" in providers
    from gpuload import native

    if native.available():
        assert {"gpuload-native-aligned", "gpuload-native-aligned-shuffle", "gpuload-native-aligned-ring"} <= set(providers)
    assert json.loads(out.read_text())["rows"] == result["rows"]
    for row in result["rows"]:
        assert row["median_us"] > 0 and row["tokens_per_s"] > 0
    assert "vs nanogpt" in capsys.readouterr().out


def test_aligned_providers_check_their_batches(tmp_path, monkeypatch):
    bench = load_benchmark("bench_cpu_gather")
    path = str(tmp_path / "train.bin")
    bench.write_token_file(path, 200_000)
    stream = np.memmap(path, dtype=np.uint16, mode="r")
    assert stream[0] == bench.BOS and 100 < int((stream == bench.BOS).sum()) < 600  # documents of ~700 tokens
    x, y = bench.aligned_provider(path, 4, 64, backend="torch", sampling="random")()
    assert (x[:, 0] == bench.BOS).all() and torch.equal(x[:, 1:], y[:, :-1])
    # A loader that reads other windows than its starts is refused before anything is timed.
    from gpuload import GPULoader

    real = GPULoader.window_starts
    monkeypatch.setattr(GPULoader, "window_starts", lambda self, step: real(self, step) + 1)
    with pytest.raises(SystemExit, match="read other windows"):
        bench.aligned_provider(path, 4, 64, backend="torch", sampling="random")


def test_nanogpt_provider_is_a_real_get_batch(tmp_path):
    bench = load_benchmark("bench_cpu_gather")
    path = str(tmp_path / "train.bin")
    bench.write_token_file(path, 10_000)
    x, y = bench.nanogpt_get_batch(path, 4, 16)
    assert x.shape == y.shape == (4, 16)
    assert (x[:, 1:] == y[:, :-1]).all()


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_cpu_gather_microbenchmark(benchmark, make_shards, backend):
    """pytest-benchmark timing of the CPU paths (informational; compare with --benchmark-compare)."""
    from gpuload import GPULoader, native

    if backend == "native" and not native.available():
        pytest.skip("native extension not built")
    ld = GPULoader(make_shards([200_000]), batch_size=8, seq_len=256, rank=0, world_size=1, device="cpu",
                   backend=backend)
    x, y = benchmark(ld.__next__)
    assert x.shape == (8, 256)


def test_bench_fill_quick(tmp_path, capsys):
    out = tmp_path / "result.json"
    result = load_benchmark("bench_fill").main(["--quick", "--json", str(out)])
    providers = [row["provider"] for row in result["rows"]]
    assert providers == ["floor-memcpy", "python-read_into", "memmap-copyto"]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    for row in result["rows"]:
        assert row["median_gbs"] > 0 and row["p10_gbs"] <= row["median_gbs"] <= row["p90_gbs"]
    assert "vs floor" in capsys.readouterr().out


def test_bench_train_step_quick(tmp_path, capsys):
    from gpuload.bench.providers import PROVIDER_NAMES, unavailable

    out = tmp_path / "result.json"
    result = load_benchmark("bench_train_step").main(
        ["--quick", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"), "--json", str(out)])
    runnable = [name for name in PROVIDER_NAMES if not unavailable(name, torch.device("cpu"))]
    assert [row["provider"] for row in result["rows"]] == ["resident", *runnable]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    for row in result["rows"]:
        assert 0 < row["p10_ms"] <= row["ms_per_step"] <= row["p90_ms"] and row["stall"] < 1
    assert result["rows"][0]["stall"] == 0.0
    assert "data stall" in capsys.readouterr().out


def test_bench_ring_quick(tmp_path, capsys):
    out = tmp_path / "ring.json"
    result = load_benchmark("bench_ring").main(["--quick", "--json", str(out)])
    assert json.loads(out.read_text())["refill"] == result["refill"]
    for row in result["refill"]:
        assert row["bytes"] > 0 and row["gb_per_s"] > 0 and row["copy_gb_per_s"] > 0
    assert {c["backend"] for c in result["next"]} >= {"torch"}
    assert all(c["host_us"] > 0 for c in result["next"])
    assert "refill into" in capsys.readouterr().out


def test_gpu_acceptance_dry_run_lists_its_steps_and_checks_arguments(tmp_path):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "gpu_acceptance.sh")
    out = subprocess.run(["bash", script, "--dry-run", "--out", str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    steps = [line.split()[0] for line in out.stdout.splitlines() if " guard " in line]
    assert steps == ["install", "machine", "tests", "bench_kernels", "bench_ring", "bench_host", "bench_train_step",
                     "gpuload_bench"]
    assert "pip install --no-deps --no-build-isolation -e ." in out.stdout and "preflight: " in out.stdout
    assert not any((tmp_path / "out").iterdir())  # a dry run writes nothing
    for args, message in ((["--budget", "soon"], "whole seconds"), (["--budget", "10"], "too short"),
                          (["--frobnicate"], "unknown argument"), (["--out"], "usage")):
        bad = subprocess.run(["bash", script, "--dry-run", *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and message in bad.stderr, (args, bad.stderr)


def test_bench_host_quick_checks_the_launch_and_counts_no_allocation_with_static_buffers(tmp_path):
    """The stubbed host benchmark in a fresh process (kernels compiled for sm_90, only the launcher stubbed):
    the loader's launch passes the kernel what Triton's own route passes, and static buffers allocate nothing."""
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, os.path.join(BENCH_DIR, "bench_host.py"), "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env={**env, "TRITON_CACHE_DIR": str(tmp_path)})
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["backend"], r["config"]): r for r in json.loads(out.read_text())["rows"]}
    static, fresh = rows["triton", "static-whole-random"], rows["triton", "whole-random"]
    assert static["launch_check"] == fresh["launch_check"] == "equal"
    assert static["torch_ops_per_step"] == 0 and fresh["torch_ops_per_step"] <= 2  # x and y, nothing else
    assert static["stubbed"] and static["median_us"] > 0 and static["calls_per_step"] > 0


def test_bench_packing_quick(tmp_path):
    out = tmp_path / "packing.json"
    result = load_benchmark("bench_packing").main(["--quick", "--json", str(out)])
    by = {(r["provider"], r["lengths"]): r for r in result["rows"]}
    for lengths in ("geometric", "heavy"):
        ours, theirs = by["gpuload-bestfit", lengths], by["nanochat-bestfit-crop", lengths]
        assert ours["floor"] <= ours["cropped_fraction"] <= theirs["cropped_fraction"]  # the goal
        assert by["gpuload-bestfit-remainder", lengths]["cropped_fraction"] < 0.01
        assert by["concatenation", lengths]["bos_rows"] < 0.1 and ours["bos_rows"] == 1.0
    assert json.loads(out.read_text())["rows"] == result["rows"]
