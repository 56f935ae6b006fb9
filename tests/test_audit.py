"""`gpuload bench --audit`: gpuload's rows are yes everywhere, a loader that resumes wrongly is caught, peers' rows."""

import json

import numpy as np
import pytest
import torch

from gpuload import native
from gpuload.bench import audit
from gpuload.bench.providers import GPULoaderProvider, unavailable
from gpuload.cli import main

CPU = torch.device("cpu")
GPULOAD_CPU = ["gpuload-cpu-torch"] + (["gpuload-cpu-native"] if native.available() else [])


def test_gpuload_rows_are_yes_everywhere(tmp_path, capsys):
    out = tmp_path / "audit.json"
    argv = ["bench", "--audit", "--device", "cpu", "--cache-dir", str(tmp_path), "--providers",
            ",".join(GPULOAD_CPU + ["torch-dataloader"]), "--json", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "exact resume mid-epoch" in stdout and "elastic 2 -> 4" in stdout and "GPU: " in stdout
    result = json.loads(out.read_text())
    assert result["command"] == "gpuload " + " ".join(argv)
    rows = {r["provider"]: r for r in result["rows"]}
    for name in GPULOAD_CPU:
        assert [rows[name][c] for c in audit.CHECKS] == ["yes"] * 3
    hand = rows["torch-dataloader"]  # no state: says why, and its seeded sampler repeats itself
    assert hand["resume"] == "no: torch's DataLoader has no state_dict: a restart begins the sampler again"
    assert hand["deterministic"] == "yes" and hand["elastic"].startswith("no: ")
    assert f"torch-dataloader, exact resume mid-epoch: {hand['resume'][4:]}" in stdout


def test_a_wrong_restore_is_caught_and_fails_gpuload(tmp_path, monkeypatch, capsys):
    """A restore one batch late: the resume and elastic checks say no, and the command fails for a gpuload row."""
    def late(self, state):
        self.loader.load_state_dict(state)
        self()

    monkeypatch.setattr(GPULoaderProvider, "load_state_dict", late)
    result = audit.run_audit(cache_dir=str(tmp_path), device="cpu", providers=["gpuload-cpu-torch"])
    row = result["rows"][0]
    assert row["resume"] == "no: restored after batch 7: other rows from batch 0 (90% of the expected rows among them)"
    assert row["deterministic"] == "yes"
    assert row["elastic"].startswith("no: 2 ranks' states after step 7 resumed on 4: other rows from batch 0")
    assert result["status"] == 1 and "failed the audit" in capsys.readouterr().err
    assert main(["bench", "--audit", "--device", "cpu", "--cache-dir", str(tmp_path), "--providers",
                 "gpuload-cpu-torch"]) == 1


def test_compare_tells_order_from_rows():
    a = [np.arange(8).reshape(2, 4), np.arange(8, 16).reshape(2, 4)]
    assert audit.compare(a, [b.copy() for b in a]) is None
    assert audit.compare(a[::-1], a) == "the same rows in another order (from batch 0)"
    assert audit.compare([a[0], a[1][::-1]], a) == "the same rows in another order (from batch 1)"
    assert audit.compare([a[0], a[1] + 100], a) == "other rows from batch 1 (50% of the expected rows among them)"
    assert audit.compare(a[:1], a) == "other rows from batch 1 (50% of the expected rows among them)"


def test_environment_is_put_back(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv("GLOBAL_RANK", raising=False)
    import os

    with audit.environment({"WORLD_SIZE": "2", "GLOBAL_RANK": "1"}):
        assert os.environ["WORLD_SIZE"] == "2" and os.environ["GLOBAL_RANK"] == "1"
    assert os.environ["WORLD_SIZE"] == "8" and "GLOBAL_RANK" not in os.environ


@pytest.mark.parametrize("name", ["torchdata", "litdata"])
def test_peer_rows_say_what_happened(tmp_path, name):
    """Measured here: both resume exactly and repeat themselves; neither gives the 2-rank batches on 4 ranks."""
    reason = unavailable(name, CPU)
    if reason:
        pytest.skip(reason)
    from gpuload.bench.dataset import demo_dataset
    from gpuload.shards import TokenStream

    stream = TokenStream(demo_dataset(str(tmp_path), quick=True, quiet=True).paths)
    shards = stream.shards
    stream.close()
    row = audit.audit_provider(name, shards, CPU, str(tmp_path))
    assert row["resume"] == "yes" and row["deterministic"] == "yes"
    assert row["elastic"].startswith("no: 4 ranks from scratch against 2: ")
