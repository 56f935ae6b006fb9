"""gpuload inspect: counts, token range and delimiters match the shards; manifest and encoding are used when known."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from gpuload.inspect_shards import format_report, inspect, inspect_path
from gpuload.prepare import prepare
from gpuload.shards import ShardError, open_shard, write_shard

DOCS = ["alpha beta", "gamma", "delta epsilon zeta", "eta theta"]


@pytest.fixture
def prepared(tmp_path):
    """A prepared directory (bytes encoding): one val shard and several train shards."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS * 5))
    manifest = prepare([path], tmp_path / "out", encoding="bytes", shard_tokens=64, val_tokens=30, workers=1)
    return tmp_path / "out", manifest


def test_directory_report_matches_the_shards(prepared):
    out, manifest = prepared
    report = inspect_path(str(out))
    assert not report["single"] and report["manifest"] and report["encoding"] == "bytes"
    assert report["delimiter"] == 256 and report["placement"] == "eos"
    files = {s["file"]: s for s in manifest["shards"]}
    assert len(report["shards"]) == len(files)
    for row in report["shards"]:
        tokens = open_shard(row["file"]).memmap()
        entry = files[row["file"].rsplit("/", 1)[-1]]
        assert row["tokens"] == entry["tokens"] == len(tokens)
        assert (row["min"], row["max"]) == (int(tokens.min()), int(tokens.max()))
        assert row["delimiters"] == entry["documents"] == int(np.count_nonzero(tokens == 256))
        assert row["format"] == "llmc v1" and row["dtype"] == "uint16"
    assert report["totals"]["tokens"] == manifest["tokens"]
    assert report["totals"]["delimiters"] == manifest["documents"] == 20
    assert report["notes"] == []

    text = format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith(f"{out}: {len(files)} shards, encoding bytes (vocabulary 257), delimiter token 256")
    assert sum(line.lstrip().startswith(("train_", "val_")) for line in lines) == len(files)
    assert any(line.lstrip().startswith("total") and f"{manifest['tokens']:,}" in line for line in lines)
    assert "decoded: " in text


def test_single_shard_report_decodes_the_first_tokens(prepared):
    out, manifest = prepared
    report = inspect_path(str(out / "val_000000.bin"), num_tokens=5)
    assert report["single"] and report["first"]["tokens"] == list(b"alpha"[:5])
    assert report["first"]["text"] == "alpha"
    text = format_report(report)
    assert "format      llmc v1, uint16 tokens" in text and "tokens      30" in text
    assert "token 256 after each document (from manifest.json): 2 in this shard" in text
    assert "decoded: 'alpha'" in text


def test_raw_file_without_manifest_and_with_encoding(tmp_path):
    tokens = np.array(list(b"hi there") + [256] + list(b"again") + [256], dtype=np.uint16)
    write_shard(tmp_path / "data.bin", tokens, format="raw")
    report = inspect_path(str(tmp_path / "data.bin"))
    assert report["shards"][0]["format"] == "raw" and report["delimiter"] is None
    assert report["shards"][0]["delimiters"] is None and report["first"]["text"] is None
    assert "pass --encoding" in format_report(report)
    report = inspect_path(str(tmp_path / "data.bin"), encoding="bytes")
    assert report["shards"][0]["delimiters"] == 2 and report["delimiter_from"] == "--encoding"
    assert report["first"]["text"] == "hi there<|endoftext|>again<|endoftext|>"


def test_uint32_npy_and_glob(tmp_path):
    write_shard(tmp_path / "s_2.npy", np.array([70000, 5, 9], dtype=np.uint32), format="npy")
    write_shard(tmp_path / "s_10.bin", np.array([1, 2, 3, 4], dtype=np.uint32))
    report = inspect_path(str(tmp_path / "s_*"))
    assert [r["file"].rsplit("/", 1)[-1] for r in report["shards"]] == ["s_2.npy", "s_10.bin"]
    assert [r["format"] for r in report["shards"]] == ["npy", "llmc v7"]
    assert report["totals"] == {"shards": 2, "tokens": 7, "min": 1, "max": 70000, "delimiters": None}
    report = inspect_path(str(tmp_path / "s_2.npy"), encoding="bytes")
    assert "outside encoding 'bytes'" in report["notes"][0] and report["first"]["text"] is None


def test_manifest_of_another_run_is_flagged(prepared):
    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["shards"][0]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    report = inspect_path(str(out))
    assert any("belongs to another run" in note for note in report["notes"])


def test_manifest_disagreements_are_noted(prepared):
    out, _ = prepared
    manifest = json.loads((out / "manifest.json").read_text())
    missing = manifest["shards"][-1]["file"]
    (out / missing).unlink()
    manifest["shards"][1]["documents"] += 1
    manifest["token_dtype"] = "uint32"
    manifest["tokens"] += 5
    (out / "manifest.json").write_text(json.dumps(manifest))
    notes = inspect_path(str(out))["notes"]
    second = manifest["shards"][1]["file"]
    assert any(f"1 shard(s) listed in manifest.json are missing ({missing})" in n for n in notes)
    assert any(n.startswith(f"{second}: manifest.json says {manifest['shards'][1]['documents']} documents")
               for n in notes)
    assert any("says uint32 tokens, the file holds uint16" in n for n in notes)
    assert any("tokens in all, its shards list" in n for n in notes)


def test_matching_manifest_gives_no_notes(prepared):
    out, _ = prepared
    assert inspect_path(str(out))["notes"] == []


def test_input_file_hint_covers_every_input_kind(tmp_path):
    (tmp_path / "docs.ndjson").write_text("{}\n")
    with pytest.raises(ShardError, match="Tokenize it first with gpuload prepare"):
        inspect_path(str(tmp_path / "docs.ndjson"))


def test_bad_shard_and_missing_path(tmp_path):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, 1000)
    (tmp_path / "cut.bin").write_bytes(header.tobytes() + b"\0" * 10)
    with pytest.raises(ShardError, match="truncated"):
        inspect([str(tmp_path / "cut.bin")])
    with pytest.raises(FileNotFoundError):
        inspect([str(tmp_path / "none")])


@pytest.mark.parametrize("change, fault", [
    ({"encoding_name": ["x"], "vocab_size": "big"}, "field 'encoding_name': expected a string, found an array"),
    ({"encoding": ["bytes"]}, "field 'encoding': expected a string, found an array"),
    ({"shards": [1, 2]}, r"field 'shards\[0\]': expected an object with a 'file' name, found a number"),
    ({"tokens": "5"}, "field 'tokens': expected a whole number >= 0, found a string"),
    ({"delimiter": {"token": "x", "placement": ["eos"]}}, "field 'delimiter.token': expected a token id"),
])
def test_malformed_manifest_is_noted_and_the_shards_still_listed(prepared, change, fault):
    out, manifest = prepared
    (out / "manifest.json").write_text(json.dumps({**manifest, **change}))
    report = inspect_path(str(out))
    assert not report["manifest"] and report["encoding"] is None and report["delimiter"] is None
    assert len(report["shards"]) == len(manifest["shards"]) and report["totals"]["tokens"] == manifest["tokens"]
    assert report["notes"][0].startswith(f"{out / 'manifest.json'}: malformed manifest: ")
    assert re.search(fault, report["notes"][0]) and "are not used" in report["notes"][0]
    assert "malformed manifest" in format_report(report)


def test_inspect_command_reports_a_deeply_nested_manifest(prepared):
    """json raises RecursionError on "[" * 100000; the command says the manifest is bad, not "internal error"."""
    out, manifest = prepared
    (out / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-m", "gpuload", "inspect", str(out)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0 and "internal error" not in result.stderr, result.stderr
    assert f"note: {out / 'manifest.json'}: malformed manifest: not valid JSON (nested too deeply" in result.stdout
    assert f"{len(manifest['shards'])} shards" in result.stdout
