"""The gpuload command line: arguments reach the implementations; user errors are one line and status 2."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpuload.cli import count, main, unescape
from gpuload.shards import open_shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(*args, **kwargs):
    """`python -m gpuload ARGS` in a fresh interpreter, as a user runs it."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "gpuload", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kwargs)


def test_prepare_then_inspect(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n\n")
    status = main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--encoding", "bytes",
                   "--doc-sep", r"\n\n", "--shard-tokens", "1k", "--workers", "1"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert captured.out.startswith(f"wrote 1 shard to {tmp_path / 'out'}: 1 train (21 tokens); 2 documents")
    assert "prepare  100%" in captured.err  # the progress line, on stderr
    tokens = open_shard(str(tmp_path / "out" / "train_000000.bin")).memmap()
    np.testing.assert_array_equal(tokens, list(b"first doc") + [256] + list(b"second doc") + [256])
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["doc_sep"] == "\n\n" and manifest["shard_tokens"] == 1000

    assert main(["inspect", str(tmp_path / "out")]) == 0
    assert "train_000000.bin" in capsys.readouterr().out
    assert main(["inspect", "--json", str(tmp_path / "out" / "train_000000.bin")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["totals"]["delimiters"] == 2 and report[0]["first"]["text"].startswith("first doc")


def test_quiet_prints_nothing(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x")
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--encoding", "bytes",
                 "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")


def test_skipped_records_are_reported(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    assert main(["prepare", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--encoding", "bytes",
                 "--skip-bad", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "gpuload: warning: skipped 1 bad records" in err and "a.jsonl, line 2" in err


@pytest.mark.parametrize("args, message", [
    (["prepare", "{tmp}/missing.jsonl", "--out", "{tmp}/out", "--encoding", "bytes"], "no such file or directory"),
    (["prepare", "{tmp}/bad.jsonl", "--out", "{tmp}/out", "--encoding", "bytes"], "bad.jsonl, line 1: not valid JSON"),
    (["prepare", "{tmp}/bad.jsonl", "--out", "{tmp}/out", "--encoding", "{tmp}/none.tiktoken"],
     "none.tiktoken not found"),
    (["prepare", "{tmp}/bad.jsonl", "--out", "{tmp}/out", "--encoding", "gpt9"], "unknown encoding 'gpt9'"),
    (["inspect", "{tmp}/bad.jsonl"], "bad.jsonl: expected a token shard"),
    (["inspect", "{tmp}/nothing"], "no such shard file or directory"),
])
def test_user_errors_are_one_line_with_status_2(tmp_path, capsys, args, message):
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    status = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("gpuload: error: ") and message in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n")  # one line
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_max_doc_bytes_option(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("x" * 2048)
    status = main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--encoding", "bytes",
                   "--max-doc-bytes", "1K", "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "2,048 bytes as one document" in err and "--doc-sep" in err and err.count("\n") == 1
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--encoding", "bytes",
                 "--max-doc-bytes", "2K", "--quiet"]) == 0


def test_a_bug_is_an_internal_error_with_a_traceback(tmp_path, capsys, monkeypatch):
    """A ValueError that is not one of gpuload's own error types is a bug, not bad input."""
    import gpuload.prepare

    def broken(*args, **kwargs):
        raise ValueError("boom")

    monkeypatch.setattr(gpuload.prepare, "prepare", broken)
    status = main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" in err and "ValueError: boom" in err and "internal error: please report" in err


def test_named_encoding_offline_is_a_user_error(tmp_path, capsys, monkeypatch):
    import requests
    import tiktoken.load
    import tiktoken.registry

    import gpuload.encodings as encodings

    def no_network(url):
        raise requests.exceptions.ConnectionError("no network")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    monkeypatch.delitem(encodings._CACHE, "gpt2", raising=False)
    (tmp_path / "a.txt").write_text("x")
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out")]) == 2  # gpt2 is the default
    err = capsys.readouterr().err
    assert err.startswith("gpuload: error: cannot load tiktoken encoding 'gpt2'") and "TIKTOKEN_CACHE_DIR" in err


def test_argument_errors_and_help(capsys):
    assert main(["prepare", "x.txt"]) == 2  # --out is required
    assert "--out" in capsys.readouterr().err
    assert main(["prepare", "x.txt", "--out", "o", "--shard-tokens", "lots"]) == 2
    assert "expected a count" in capsys.readouterr().err
    assert main([]) == 2
    assert main(["--help"]) == 0
    assert "prepare" in capsys.readouterr().out


def test_count_and_unescape():
    assert [count(t) for t in ("1000", "100M", "2.5k", "1G", "1e8")] == [1000, 10**8, 2500, 10**9, 10**8]
    assert unescape(r"\n\n") == "\n\n" and unescape(r"a\tb\\n") == "a\tb\\n"
    assert unescape("<|endoftext|>") == "<|endoftext|>"


def test_python_dash_m_runs_with_workers(tmp_path):
    """The module entry point, with worker processes (they must not re-run the command)."""
    docs = "".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(400))
    (tmp_path / "a.jsonl").write_text(docs)
    result = run_module("prepare", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--encoding", "bytes",
                        "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("wrote 1 shard ") == 1
    result = run_module("inspect", str(tmp_path / "out"))
    assert result.returncode == 0 and "400" in result.stdout
    result = run_module("prepare", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), "--encoding", "bytes")
    assert result.returncode == 2 and result.stderr.startswith("gpuload: error: ") and "Traceback" not in result.stderr


def test_demo_arguments_reach_run_demo(monkeypatch):
    demo = pytest.importorskip("gpuload.demo")
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: calls.append(kwargs))
    assert main(["demo"]) == 0
    assert main(["demo", "--dir", "d", "--batch-size", "2", "--seq-len", "8", "--steps", "5", "--sampling",
                 "shuffle", "--seed", "7"]) == 0
    assert calls == [
        dict(directory=None, batch_size=4, seq_len=16, steps=3, sampling="random", seed=0),
        dict(directory="d", batch_size=2, seq_len=8, steps=5, sampling="shuffle", seed=7),
    ]


def test_demo_runs(tmp_path, capsys):
    pytest.importorskip("gpuload.demo")
    assert main(["demo", "--dir", str(tmp_path), "--steps", "1", "--sampling", "sequential"]) == 0
    assert "step 0" in capsys.readouterr().out
