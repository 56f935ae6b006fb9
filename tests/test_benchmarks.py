"""Every benchmark also runs in its tiny smoke mode here, so none of them can rot."""

import importlib.util
import json
import os

import pytest

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
    assert json.loads(out.read_text())["rows"] == result["rows"]
    for row in result["rows"]:
        assert row["median_us"] > 0 and row["tokens_per_s"] > 0
    assert "vs nanogpt" in capsys.readouterr().out


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
