"""gpuload prepare: shards hold exactly tiktoken's tokens, for every input kind, worker count and failure."""

import base64
import errno
import glob
import importlib.util
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import gpuload.encodings as encodings
import gpuload.prepare as prep
from gpuload.encodings import EncodingError, get_encoding
from gpuload.prepare import PrepareError, prepare
from gpuload.progress import Progress
from gpuload.shards import HEADER_BYTES, open_shard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Héllo wörld, naïve café — 中文 and emoji 🙂 too.",
    "A document that mentions <|endoftext|> as plain text must not get the special token.",
    "",  # empty: skipped, never a lone delimiter
    "line one\nline two\n\nand then the end   ",
    "  the theme of the thing: and then, and then\tthe end",
    "1234567 numbers 3.14159 and symbols !@#$%^&*()",
]
MERGES = [b"th", b"he", b" t", b"in", b"er", b"an", b"the", b" th", b" the", b"ing", b"nd", b"and", b" a", b" and"]


def write_ranks(path, ranks):
    """A tiktoken ranks file: base64 token, space, rank per line."""
    with open(path, "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return str(path)


@pytest.fixture
def small_ranks(tmp_path):
    """256 single bytes plus a few merges: a real BPE vocabulary of 270 tokens, written in the test."""
    ranks = {bytes([i]): i for i in range(256)}
    for token in MERGES:
        ranks[token] = len(ranks)
    return write_ranks(tmp_path / "small.tiktoken", ranks)


@pytest.fixture
def big_ranks(tmp_path):
    """Every byte pair as a token (65,792 in all), printable pairs last so text uses ids above 65535."""
    ranks = {bytes([i]): i for i in range(256)}
    pairs = sorted((bytes([a, b]) for a in range(256) for b in range(256)),
                   key=lambda p: (p.isascii() and p.decode().isprintable(), p))
    for token in pairs:
        ranks[token] = len(ranks)
    return write_ranks(tmp_path / "big.tiktoken", ranks)


def expected_tokens(spec, docs, bos=False):
    """The reference: tiktoken's encode_ordinary per non-empty document, delimiter after (or before) each."""
    enc = get_encoding(spec)
    out = []
    for doc in docs:
        if doc:
            tokens = enc.encode_ordinary(doc)
            out += [enc.eot_token] + tokens if bos else tokens + [enc.eot_token]
    return np.array(out, dtype=np.int64)


def read_stream(out):
    """All tokens of a prepared directory, in stream order (val shards first), via the manifest."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = [open_shard(str(out / s["file"])) for s in manifest["shards"]]
    return np.concatenate([s.memmap() for s in shards]).astype(np.int64)


def write_inputs(directory, docs, kind, sep="<|doc|>"):
    """The documents as `kind` inputs; returns (paths, extra prepare kwargs)."""
    os.makedirs(directory, exist_ok=True)
    if kind == "txt-files":
        paths = []
        for i, doc in enumerate(docs):
            paths.append(os.path.join(directory, f"doc_{i}.txt"))
            with open(paths[-1], "w", encoding="utf-8") as f:
                f.write(doc)
        return paths, {}
    if kind == "txt-sep":
        path = os.path.join(directory, "all.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(sep.join(docs))
        return [path], {"doc_sep": sep}
    if kind == "jsonl":
        path = os.path.join(directory, "all.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"id": 1, "text": doc}) + "\n")
        return [path], {}
    path = os.path.join(directory, "all.parquet")
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path, row_group_size=3)
    return [path], {}


def listing(out):
    return sorted(os.listdir(out))


def assert_nothing_written(out):
    """No shard, manifest, temporary or staging file: a failed run leaves the directory as it found it."""
    if os.path.exists(out):
        left = [n for n in os.listdir(out) if n.endswith((".bin", ".tmp")) or n == "manifest.json"
                or n.startswith(prep.STAGING_PREFIX)]
        assert left == []


# ---------------------------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize("kind", ["txt-files", "txt-sep", "jsonl", "parquet"])
@pytest.mark.parametrize("encoding", ["bytes", "small-ranks"])
def test_tokens_equal_tiktoken_encode_ordinary(tmp_path, small_ranks, kind, encoding):
    spec = small_ranks if encoding == "small-ranks" else "bytes"
    paths, kwargs = write_inputs(tmp_path / "in", DOCS, kind)
    manifest = prepare(paths, tmp_path / "out", encoding=spec, workers=1, **kwargs)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens(spec, DOCS))
    assert manifest["documents"] == sum(1 for d in DOCS if d)
    assert manifest["empty_documents"] == 1


def test_bos_puts_the_delimiter_before_each_document(tmp_path, small_ranks):
    paths, _ = write_inputs(tmp_path / "in", DOCS, "jsonl")
    manifest = prepare(paths, tmp_path / "out", encoding=small_ranks, bos=True, workers=1)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens(small_ranks, DOCS, bos=True))
    assert manifest["delimiter"]["placement"] == "bos"


def test_strip_trims_documents(tmp_path):
    paths, kwargs = write_inputs(tmp_path / "in", ["  a  ", "\n\n", " b"], "txt-sep", sep="|")
    prepare(paths, tmp_path / "out", encoding="bytes", strip=True, workers=1, **kwargs)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", ["a", "b"]))


@pytest.mark.parametrize("sep", ["\n\n", "\n", "<|endoftext|>", "abab"])
def test_doc_sep_splits_like_str_split_whatever_the_batch_size(tmp_path, sep):
    """Batches cut where a split of the whole file would, also for separators that overlap themselves."""
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(["a", "b", "ab", " ", "\n", "\n\n\n", "abab", "<|endoftext|>", "é"], 600))
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    expected = expected_tokens("bytes", text.split(sep))
    for batch_bytes in (1, 2, 3, 5, 8, 64, 1 << 20):
        out = tmp_path / f"out{batch_bytes}"
        prepare([tmp_path / "in.txt"], out, encoding="bytes", doc_sep=sep, batch_bytes=batch_bytes, workers=1)
        np.testing.assert_array_equal(read_stream(out), expected, err_msg=f"batch_bytes={batch_bytes}")


def test_mixed_kinds_directories_and_globs_keep_input_order(tmp_path):
    docs = [f"document number {i}" for i in range(12)]
    write_inputs(tmp_path / "a" / "sub", docs[0:3], "txt-files")  # doc_0..doc_2 in a directory
    jsonl, _ = write_inputs(tmp_path / "b", docs[3:6], "jsonl")
    parquet, _ = write_inputs(tmp_path / "c", docs[6:9], "parquet")
    for i, doc in enumerate(docs[9:12]):
        (tmp_path / f"part_{i + 9}.txt").write_text(doc)
    inputs = [tmp_path / "a", jsonl[0], parquet[0], str(tmp_path / "part_*.txt")]
    manifest = prepare(inputs, tmp_path / "out", encoding="bytes", workers=1)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", docs))
    assert [i["kind"] for i in manifest["inputs"]] == ["text"] * 3 + ["jsonl", "parquet"] + ["text"] * 3
    assert [i["documents"] for i in manifest["inputs"]] == [1, 1, 1, 3, 3, 1, 1, 1]


def test_natural_order_within_a_directory(tmp_path):
    for i in (10, 2, 1):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"shard_{i}.txt").write_text(f"doc {i}")
    prepare([tmp_path / "in"], tmp_path / "out", encoding="bytes", workers=1)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", ["doc 1", "doc 2", "doc 10"]))


# ---------------------------------------------------------------------------------------------
# Shards and manifest


def test_uint16_shards_have_the_llmc_v1_header(tmp_path, small_ranks):
    paths, _ = write_inputs(tmp_path / "in", DOCS, "jsonl")
    manifest = prepare(paths, tmp_path / "out", encoding=small_ranks, workers=1)
    path = tmp_path / "out" / "train_000000.bin"
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [20240520, 1, manifest["tokens"]] and not header[3:].any()
    assert os.path.getsize(path) == HEADER_BYTES + 2 * manifest["tokens"]
    assert manifest["token_dtype"] == "uint16" and manifest["vocab_size"] == 256 + len(MERGES) + 1


def test_uint32_when_the_vocabulary_exceeds_65536(tmp_path, big_ranks):
    docs = ["the theory: zebras eat hay", "qq xx zz the end", "~~ {} || <> ^^"]
    paths, _ = write_inputs(tmp_path / "in", docs, "jsonl")
    manifest = prepare(paths, tmp_path / "out", encoding=big_ranks, workers=1)
    expected = expected_tokens(big_ranks, docs)
    assert expected.max() > 65535  # the test is only meaningful if ids above uint16 occur
    shard = open_shard(str(tmp_path / "out" / "train_000000.bin"))
    assert shard.dtype == np.uint32 and manifest["token_dtype"] == "uint32"
    assert list(np.fromfile(shard.path, dtype="<i4", count=2)) == [20240801, 7]
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected)
    assert manifest["delimiter"]["token"] == 65792


def test_shard_size_val_split_and_manifest(tmp_path, small_ranks):
    docs = [f"the {i} and the other {i * 7} things" for i in range(40)]
    paths, _ = write_inputs(tmp_path / "in", docs, "jsonl")
    manifest = prepare(paths, tmp_path / "out", encoding=small_ranks, shard_tokens=100, val_tokens=250, workers=1)
    expected = expected_tokens(small_ranks, docs)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected)

    shards = manifest["shards"]
    assert [s["file"] for s in shards[:4]] == ["val_000000.bin", "val_000001.bin", "val_000002.bin", "train_000000.bin"]
    assert [s["tokens"] for s in shards[:3]] == [100, 100, 50]
    assert all(s["tokens"] == 100 for s in shards[3:-1]) and 0 < shards[-1]["tokens"] <= 100
    eot = manifest["delimiter"]["token"]
    for s in shards:
        tokens = open_shard(str(tmp_path / "out" / s["file"])).memmap()
        assert s["documents"] == int(np.count_nonzero(tokens == eot))
    assert sum(s["documents"] for s in shards) == manifest["documents"] == 40
    assert manifest["tokens"] == len(expected)
    assert manifest["encoding"] == os.path.abspath(small_ranks) and len(manifest["encoding_sha256"]) == 64
    assert manifest["inputs"] == [{"path": os.path.abspath(paths[0]), "kind": "jsonl",
                                   "bytes": os.path.getsize(paths[0]), "documents": 40, "tokens": len(expected)}]
    assert manifest["skipped"] == {"count": 0, "examples": []}
    assert listing(tmp_path / "out") == sorted(["manifest.json"] + [s["file"] for s in shards])


def test_workers_1_and_n_give_identical_shards(tmp_path, small_ranks, monkeypatch):
    docs = [f"the {i} thing and another, in the end {'x' * (i % 13)}" for i in range(300)]
    inputs = write_inputs(tmp_path / "in" / "j", docs[:100], "jsonl")[0]
    inputs += write_inputs(tmp_path / "in" / "p", docs[100:200], "parquet")[0]
    inputs += write_inputs(tmp_path / "in" / "t", docs[200:], "txt-sep", sep="<|doc|>")[0]
    options = dict(encoding=small_ranks, doc_sep="<|doc|>", shard_tokens=1000, val_tokens=1500, batch_bytes=500)
    prepare(inputs, tmp_path / "w1", workers=1, **options)
    prepare(inputs, tmp_path / "w2", workers=2, **options)
    monkeypatch.setenv("GPULOAD_START_METHOD", "spawn")  # the macOS/Windows default must give the same bytes
    prepare(inputs, tmp_path / "w2-spawn", workers=2, **options)
    names = listing(tmp_path / "w1")
    assert len(names) > 5
    for other in ("w2", "w2-spawn"):
        assert listing(tmp_path / other) == names
        for name in names:
            assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / other / name).read_bytes(), name
    np.testing.assert_array_equal(read_stream(tmp_path / "w1"), expected_tokens(small_ranks, docs))


def test_shards_load_in_gpuloader(tmp_path):
    from gpuload import GPULoader

    docs = [f"document {i} " + "abc" * (i % 5) for i in range(50)]
    paths, _ = write_inputs(tmp_path / "in", docs, "jsonl")
    prepare(paths, tmp_path / "out", encoding="bytes", shard_tokens=300, val_tokens=200, workers=1)
    stream = read_stream(tmp_path / "out")
    train = sorted(glob.glob(str(tmp_path / "out" / "train_*.bin")))
    loader = GPULoader(train, batch_size=2, seq_len=8, sampling="sequential", seed=0, rank=0, world_size=1,
                       device="cpu")
    x, y = next(loader)
    train_stream = stream[200:]
    assert x.tolist() == [train_stream[0:8].tolist(), train_stream[8:16].tolist()]
    assert y.tolist() == [train_stream[1:9].tolist(), train_stream[9:17].tolist()]


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error naming the place, or a count with skip_bad; never a half-written output


def _bad_jsonl(path, bad_line):
    lines = [json.dumps({"text": "good one"}), json.dumps({"text": "good two"}), bad_line, json.dumps({"text": "last"})]
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines) + b"\n")
    return path


@pytest.mark.parametrize("bad_line, message", [
    ('{"text": "unterminated', "line 3: not valid JSON"),
    ('{"body": "no text field"}', "line 3: no field 'text' (fields: body)"),
    ('{"text": null}', "line 3: field 'text' is null; expected a string"),
    ('["an", "array"]', "line 3: expected a JSON object"),
    (b'{"text": "caf\xe9"}', "line 3: not valid UTF-8 (byte 0xe9"),
])
@pytest.mark.parametrize("workers", [1, 2])
def test_bad_jsonl_line_names_file_and_line(tmp_path, bad_line, message, workers):
    path = _bad_jsonl(tmp_path / "data.jsonl", bad_line)
    with pytest.raises(PrepareError) as info:
        prepare([path], tmp_path / "out", encoding="bytes", workers=workers, batch_bytes=40)
    assert f"{path}, {message}" in str(info.value) and "--skip-bad" in str(info.value)
    assert_nothing_written(tmp_path / "out")


def test_skip_bad_counts_bad_lines_and_keeps_the_rest(tmp_path):
    path = _bad_jsonl(tmp_path / "data.jsonl", '{"text": "unterminated')
    manifest = prepare([path], tmp_path / "out", encoding="bytes", skip_bad=True, workers=1)
    expected = expected_tokens("bytes", ["good one", "good two", "last"])
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected)
    assert manifest["skipped"]["count"] == 1
    assert manifest["skipped"]["examples"][0]["where"] == f"{path}, line 3"


def test_non_utf8_text_names_file_and_line(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"first doc\nstill first|second\ndoc|third \xff\xfe bad\n|fourth")
    with pytest.raises(PrepareError, match=r"data\.txt, line 3: not valid UTF-8 \(byte 0xff\)"):
        prepare([path], tmp_path / "out", encoding="bytes", doc_sep="|", workers=1)
    assert_nothing_written(tmp_path / "out")
    manifest = prepare([path], tmp_path / "out", encoding="bytes", doc_sep="|", skip_bad=True, workers=1)
    docs = ["first doc\nstill first", "second\ndoc", "\n", "fourth"]
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", docs[:2] + docs[3:]))
    assert manifest["skipped"]["count"] == 1


def test_non_utf8_whole_file_document(tmp_path):
    (tmp_path / "a.txt").write_text("fine")
    (tmp_path / "b.txt").write_bytes(b"ok\nok\nbad \xc3 here")
    with pytest.raises(PrepareError, match=r"b\.txt, line 3: not valid UTF-8"):
        prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", encoding="bytes", workers=1)
    assert_nothing_written(tmp_path / "out")


def test_parquet_without_the_column(tmp_path):
    good, _ = write_inputs(tmp_path / "g", ["kept"], "parquet")
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"content": ["x"], "url": ["u"]}), bad)
    with pytest.raises(PrepareError) as info:
        prepare([good[0], bad], tmp_path / "out", encoding="bytes", workers=1)
    assert f"{bad}: no column 'text'" in str(info.value) and "content, url" in str(info.value)
    assert_nothing_written(tmp_path / "out")
    manifest = prepare([good[0], bad], tmp_path / "out", encoding="bytes", skip_bad=True, workers=1)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", ["kept"]))
    assert manifest["skipped"]["count"] == 1


def test_parquet_null_names_row_group_and_row(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c", None]}), path, row_group_size=2)
    with pytest.raises(PrepareError, match=r"data\.parquet, row group 1, row 1: null in column 'text'"):
        prepare([path], tmp_path / "out", encoding="bytes", workers=1)
    assert_nothing_written(tmp_path / "out")


def test_parquet_column_of_the_wrong_type(tmp_path):
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), path)
    with pytest.raises(PrepareError, match=r"column 'text' holds int64; expected strings"):
        prepare([path], tmp_path / "out", encoding="bytes", workers=1)


def test_corrupt_parquet_file(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(PrepareError, match=r"data\.parquet: not a readable Parquet file"):
        prepare([path], tmp_path / "out", encoding="bytes", workers=1)


@pytest.mark.skipif(not os.path.exists("/proc/self/mem"), reason="needs Linux /proc")
@pytest.mark.parametrize("doc_sep", [None, "|"])
def test_unreadable_file(tmp_path, doc_sep):
    """/proc/self/mem opens but fails to read (EIO) even for root, which chmod cannot arrange."""
    (tmp_path / "good.txt").write_text("good")
    os.symlink("/proc/self/mem", tmp_path / "broken.txt")
    inputs = [tmp_path / "good.txt", tmp_path / "broken.txt"]
    with pytest.raises(PrepareError, match=r"broken\.txt: (reading failed|cannot read the file)"):
        prepare(inputs, tmp_path / "out", encoding="bytes", doc_sep=doc_sep, workers=1)
    assert_nothing_written(tmp_path / "out")
    manifest = prepare(inputs, tmp_path / "out", encoding="bytes", doc_sep=doc_sep, skip_bad=True, workers=1)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", ["good"]))
    assert manifest["skipped"]["count"] == 1


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_file_without_read_permission(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    with pytest.raises(PrepareError, match=r"secret\.txt: cannot open the file \(Permission denied\)"):
        prepare([path], tmp_path / "out", encoding="bytes", workers=1)


def test_missing_and_unknown_inputs(tmp_path):
    with pytest.raises(PrepareError, match="no such file or directory"):
        prepare([tmp_path / "nope.jsonl"], tmp_path / "out", encoding="bytes")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(PrepareError, match=r"data\.csv: unknown input kind; expected a file ending in \.txt"):
        prepare([tmp_path / "data.csv"], tmp_path / "out", encoding="bytes")
    with pytest.raises(PrepareError, match="no input files match"):
        prepare([str(tmp_path / "*.jsonl")], tmp_path / "out", encoding="bytes")
    assert_nothing_written(tmp_path / "out")


def test_no_documents_and_val_taking_everything(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(PrepareError, match="hold no documents"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out", encoding="bytes", workers=1)
    (tmp_path / "small.txt").write_text("tiny")
    with pytest.raises(PrepareError, match="all taken by --val-tokens 100"):
        prepare([tmp_path / "small.txt"], tmp_path / "out", encoding="bytes", val_tokens=100, workers=1)
    assert_nothing_written(tmp_path / "out")


def test_bad_options(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    for options, message in [({"shard_tokens": 0}, "--shard-tokens"), ({"shard_tokens": 2**31}, "int32"),
                             ({"val_tokens": -1}, "--val-tokens"), ({"workers": 0}, "--workers"),
                             ({"doc_sep": ""}, "--doc-sep")]:
        with pytest.raises(PrepareError, match=message):
            prepare([tmp_path / "a.txt"], tmp_path / "out", encoding="bytes", **options)


# ---------------------------------------------------------------------------------------------
# Re-runs and interruptions


def test_rerun_refuses_to_mix_and_overwrite_replaces(tmp_path):
    many = [f"doc {i} " * 20 for i in range(30)]
    paths, _ = write_inputs(tmp_path / "in", many, "jsonl")
    first = prepare(paths, tmp_path / "out", encoding="bytes", shard_tokens=500, workers=1)
    assert len(first["shards"]) > 3
    with pytest.raises(PrepareError, match="already holds prepared shards.*--overwrite"):
        prepare(paths, tmp_path / "out", encoding="bytes", workers=1)
    assert listing(tmp_path / "out") == sorted(["manifest.json"] + [s["file"] for s in first["shards"]])

    few, _ = write_inputs(tmp_path / "in2", ["just one"], "jsonl")
    second = prepare(few, tmp_path / "out", encoding="bytes", overwrite=True, workers=1)
    assert listing(tmp_path / "out") == ["manifest.json", "train_000000.bin"]  # no stale train_000001.bin ...
    assert second["documents"] == 1
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", ["just one"]))


def test_failed_overwrite_keeps_the_old_output(tmp_path):
    paths, _ = write_inputs(tmp_path / "in", ["old output"], "jsonl")
    prepare(paths, tmp_path / "out", encoding="bytes", workers=1)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in listing(tmp_path / "out")}
    bad = _bad_jsonl(tmp_path / "bad.jsonl", "not json")
    with pytest.raises(PrepareError):
        prepare([bad], tmp_path / "out", encoding="bytes", overwrite=True, workers=1)
    assert {n: (tmp_path / "out" / n).read_bytes() for n in listing(tmp_path / "out")} == before


def test_foreign_token_files_are_refused_even_with_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "train.bin").write_bytes(b"\0\0")  # nanoGPT's name: a loader would read it too
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(PrepareError, match="did not write \\(train.bin\\)"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", encoding="bytes", overwrite=True, workers=1)


def test_inputs_may_live_in_the_output_directory(tmp_path):
    (tmp_path / "input.txt").write_text("tinyshakespeare lives beside its shards")
    prepare([tmp_path / "input.txt"], tmp_path, encoding="bytes", workers=1)
    assert listing(tmp_path) == ["input.txt", "manifest.json", "train_000000.bin"]


def test_error_mid_run_leaves_no_shard(tmp_path, monkeypatch):
    docs = [f"document {i} " * 10 for i in range(200)]
    paths, _ = write_inputs(tmp_path / "in", docs, "jsonl")
    calls = []
    real_write = prep.ShardWriter.write

    def failing_write(self, tokens):
        calls.append(len(tokens))
        if len(calls) == 3:  # shards are complete in the staging directory by now
            assert glob.glob(str(tmp_path / "out" / ".gpuload-staging-*" / "train_*.bin"))
            raise RuntimeError("injected failure")
        real_write(self, tokens)

    monkeypatch.setattr(prep.ShardWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="injected"):
        prepare(paths, tmp_path / "out", encoding="bytes", shard_tokens=200, batch_bytes=2000, workers=1)
    assert_nothing_written(tmp_path / "out")


def _feed_fifo(path, data, done):
    try:
        with open(path, "wb", buffering=0) as f:  # blocks until prepare opens the pipe
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
            done.wait(60)  # keep the pipe open: prepare blocks reading it, mid-run, until killed
    except BrokenPipeError:  # prepare was killed before it read everything
        pass


def _children(pid):
    """Live processes whose parent is `pid`, from /proc/*/stat (zombies are dead)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "(comm)", which may hold spaces
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("sig, returncode", [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130),
                                             (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_killed_run_leaves_no_shard(tmp_path, sig, returncode, workers):
    """A real `gpuload prepare` reading a pipe that never ends, killed once it has finished shards.

    With workers, none outlives the main process, even killed by SIGKILL (as the OOM killer does).
    """
    fifo = tmp_path / "stream.txt"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    done = threading.Event()
    data = b"some words here\n\n" * 200_000 * workers  # with 2 workers: enough tasks to fill the window
    feeder = threading.Thread(target=_feed_fifo, args=(fifo, data, done), daemon=True)
    feeder.start()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "gpuload", "prepare", str(fifo), "--out", str(out), "--encoding", "bytes",
           "--doc-sep", "\\n\\n", "--shard-tokens", "100000", "--workers", str(workers), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while not glob.glob(str(out / ".gpuload-staging-*" / "train_000001.bin")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline, "prepare never finished a shard"
            time.sleep(0.05)
        children = _children(proc.pid) if os.path.isdir("/proc") else []
        if workers > 1 and os.path.isdir("/proc"):
            assert len(children) >= workers, children
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)  # hangs if a worker lives on holding stdout and stderr
        deadline = time.time() + 10
        while any(_alive(pid) for pid in children) and time.time() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in children if _alive(pid)], "worker processes outlived gpuload prepare"
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == returncode, stderr
    assert "Traceback" not in stderr.decode()
    assert not glob.glob(str(out / "*.bin")) and not (out / "manifest.json").exists()
    staging = glob.glob(str(out / ".gpuload-staging-*"))
    assert len(staging) == (1 if sig == signal.SIGKILL else 0)  # only SIGKILL gives no chance to clean up

    (tmp_path / "real.txt").write_text("a fresh run")
    prepare([tmp_path / "real.txt"], out, encoding="bytes", workers=1)
    assert listing(out) == ["manifest.json", "train_000000.bin"]  # the dead run's staging directory is gone


# ---------------------------------------------------------------------------------------------
# Encodings


def test_bytes_encoding():
    enc = get_encoding("bytes")
    text = "héllo <|endoftext|> 🙂"
    assert enc.encode_ordinary(text) == list(text.encode("utf-8"))
    assert enc.eot_token == 256 and enc.n_vocab == 257


def test_ranks_file_errors(tmp_path):
    with pytest.raises(EncodingError, match=r"missing\.tiktoken not found"):
        get_encoding(str(tmp_path / "missing.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"QQ== 0\nnot-a-valid-line\n")
    with pytest.raises(EncodingError, match=r"bad\.tiktoken, line 2: expected 'base64-token rank'"):
        get_encoding(str(bad))
    partial = tmp_path / "partial.tiktoken"
    write_ranks(partial, {b"a": 0, b"b": 1})
    with pytest.raises(EncodingError, match="lacks 254 of the 256 single-byte tokens"):
        get_encoding(str(partial))


def test_ranks_file_uses_the_gpt2_pattern(small_ranks):
    enc = get_encoding(small_ranks)
    assert enc._pat_str == encodings.GPT2_PATTERN
    assert enc.eot_token == 256 + len(MERGES)
    assert enc.encode_ordinary(" the") == [256 + MERGES.index(b" the")]


def test_unknown_encoding_name():
    with pytest.raises(EncodingError, match="unknown encoding 'gpt5'.*cl100k_base"):
        get_encoding("gpt5")


def test_named_encoding_offline_says_how_to_provide_the_file(tmp_path, monkeypatch):
    import requests
    import tiktoken.load
    import tiktoken.registry

    def no_network(url):
        raise requests.exceptions.ConnectionError(f"no network for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)  # never touch the real network
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "cl100k_base", raising=False)
    monkeypatch.delitem(encodings._CACHE, "cl100k_base", raising=False)
    with pytest.raises(EncodingError) as info:
        get_encoding("cl100k_base")
    message = str(info.value)
    assert "BPE file could not be fetched" in message and f"TIKTOKEN_CACHE_DIR={tmp_path}" in message
    assert "--encoding PATH.tiktoken" in message
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(EncodingError):
        prepare([tmp_path / "a.txt"], tmp_path / "out", encoding="cl100k_base")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Progress line and the benchmark smoke mode


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_line():
    stream = io.StringIO()
    with Progress("prepare", total=100, rate="tokens", stream=stream, interval=0) as progress:
        progress.update(nbytes=2_000_000, advance=50, docs=10, tokens=1500)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in stream.getvalue()
    assert lines[0].startswith("prepare   50%  10 docs  1.50k tokens  2.0 MB") and "left" in lines[0]
    assert "tokens/s" in lines[-1] and "left" not in lines[-1]

    tty = FakeTTY()
    with Progress("bench", stream=tty, interval=0) as progress:
        progress.update(nbytes=1, rows=1)
        progress.update(nbytes=1, rows=1)
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().endswith("\n")

    quiet = io.StringIO()
    with Progress("x", quiet=True, stream=quiet) as progress:
        progress.update(nbytes=5, n=1)
    assert quiet.getvalue() == ""


def test_bench_prepare_quick(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_prepare", os.path.join(REPO, "benchmarks", "bench_prepare.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "result.json"
    result = bench.main(["--quick", "--workers", "1", "--json", str(out)])
    assert [r["provider"] for r in result["rows"]] == ["tiktoken", "gpuload-jsonl", "gpuload-parquet", "gpuload-txt"]
    assert json.loads(out.read_text())["rows"] == result["rows"]
    assert all(r["mb_per_s"] > 0 and r["tokens_per_s"] > 0 for r in result["rows"])
    printed = capsys.readouterr().out
    assert "vs tiktoken" in printed and "CPU:" in printed


# ---------------------------------------------------------------------------------------------
# Review fixes (issue 5)


@pytest.mark.parametrize("workers", [1, 2])
def test_lone_surrogate_in_jsonl_is_encoded_like_tiktoken(tmp_path, small_ranks, workers):
    """JSON may escape a lone surrogate; tiktoken's encode_ordinary repairs it to U+FFFD, and so must prepare."""
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "bad \\ud800 x"}\n{"text": "fine"}\n')
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    for spec in ("bytes", small_ranks):
        out = tmp_path / f"out-{os.path.basename(spec)}"
        manifest = prepare([path], out, encoding=spec, workers=workers, skip_bad=True)
        np.testing.assert_array_equal(read_stream(out), expected_tokens(spec, docs))
        assert manifest["text_bytes"] == len("bad \ufffd x".encode()) + len("fine")
        assert manifest["skipped"]["count"] == 0


def test_hidden_files_in_a_directory_are_skipped(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "data.jsonl").write_text('{"text": "kept"}\n')
    (tmp_path / "in" / "._data.jsonl").write_bytes(b"\x00\x05\x16\x07 macOS resource fork")
    manifest = prepare([tmp_path / "in"], tmp_path / "out", encoding="bytes", workers=1)
    assert [os.path.basename(i["path"]) for i in manifest["inputs"]] == ["data.jsonl"]


@pytest.mark.parametrize("kind", ["jsonl", "txt-sep", "txt-files"])
def test_utf8_bom_at_the_start_of_a_file_is_dropped(tmp_path, kind):
    paths, kwargs = write_inputs(tmp_path / "in", DOCS, kind)
    for path in paths:
        data = open(path, "rb").read()
        with open(path, "wb") as f:
            f.write(b"\xef\xbb\xbf" + data)
    prepare(paths, tmp_path / "out", encoding="bytes", workers=1, batch_bytes=16, **kwargs)
    np.testing.assert_array_equal(read_stream(tmp_path / "out"), expected_tokens("bytes", DOCS))


def test_whole_file_document_larger_than_max_doc_bytes_is_refused(tmp_path):
    path = tmp_path / "big.txt"
    path.write_text("x" * 1000)
    with pytest.raises(PrepareError, match=r"big\.txt: 1,000 bytes as one document .* at most 999 .*--doc-sep"):
        prepare([path], tmp_path / "out", encoding="bytes", workers=1, max_doc_bytes=999)
    assert_nothing_written(tmp_path / "out")
    prepare([path], tmp_path / "out", encoding="bytes", workers=1, max_doc_bytes=999, doc_sep="\n")


def test_input_bytes_in_flight_are_bounded(tmp_path, small_ranks):
    """A few large tasks wait for earlier results instead of all being handed to workers at once."""
    submitted = []

    def tasks():
        for i in range(8):
            submitted.append(i)
            yield ("text", 0, "doc.txt", b"some text", 1, b"\n"), 100

    results = prep.encode_tasks(tasks(), ("bytes", False, False, False), 2, max_bytes=150)
    first, _ = next(results)
    assert len(submitted) == 2  # by count alone (2 * workers + 2) it would be 6
    assert len(list(results)) == 7 and len(first.tokens) == len("some text") + 1


def test_compressed_input_says_to_decompress(tmp_path):
    (tmp_path / "data.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(PrepareError, match=r"data\.jsonl\.gz: compressed inputs are not read.*Decompress it first"):
        prepare([tmp_path / "data.jsonl.gz"], tmp_path / "out", encoding="bytes")


def test_disk_full_is_a_prepare_error(tmp_path, monkeypatch):
    import errno

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep.ShardWriter, "_finish", full)
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(PrepareError, match=r"out: writing train_000000\.bin failed \(No space left on device\); "
                                           r"free space or choose another --out"):
        prepare([tmp_path / "a.txt"], tmp_path / "out", encoding="bytes", workers=1)


@pytest.mark.parametrize("ranks, dtype", [(65535, np.uint16), (65536, np.uint32)])
def test_token_dtype_boundary(tmp_path, ranks, dtype):
    """65,535 ranks plus <|endoftext|> (id 65535) fit uint16; one more rank needs uint32."""
    table = {bytes([i]): i for i in range(256)}
    for a in range(256):
        for b in range(256):
            if len(table) == ranks:
                break
            table[bytes([a, b])] = len(table)
    spec = write_ranks(tmp_path / f"r{ranks}.tiktoken", table)
    (tmp_path / "a.txt").write_text("some text")
    manifest = prepare([tmp_path / "a.txt"], tmp_path / "out", encoding=spec, workers=1)
    assert manifest["token_dtype"] == np.dtype(dtype).name and manifest["delimiter"]["token"] == ranks
    shard = open_shard(str(tmp_path / "out" / "train_000000.bin"))
    assert shard.dtype == dtype and int(shard.memmap()[-1]) == ranks


def test_workers_are_capped_at_the_usable_cores(tmp_path, monkeypatch):
    """--workers 1000 on 2 cores starts 2 workers, not one per task (247 on issue 14's input), and says so."""
    used = []

    def recording(tasks, encoder_args, workers, **kwargs):
        used.append(workers)
        return real_encode_tasks(tasks, encoder_args, 1, **kwargs)  # one process: the count is what is tested

    real_encode_tasks = prep.encode_tasks
    monkeypatch.setattr(prep, "usable_cores", lambda: 2)
    monkeypatch.setattr(prep, "encode_tasks", recording)
    paths, _ = write_inputs(tmp_path / "in", [f"document {i}" for i in range(200)], "jsonl")
    with pytest.warns(UserWarning, match=r"--workers 1000 capped at the 2 usable cores"):
        prepare(paths, tmp_path / "a", encoding="bytes", workers=1000, batch_bytes=100)  # ~50 tasks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as many workers as cores: nothing to say
        prepare(paths, tmp_path / "b", encoding="bytes", workers=2, batch_bytes=100)
    assert used == [2, 2]


def test_cli_says_when_workers_are_capped(tmp_path, monkeypatch, capsys):
    from gpuload.cli import main

    monkeypatch.setattr(prep, "usable_cores", lambda: 2)
    (tmp_path / "a.txt").write_text("some text")
    assert main(["prepare", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out"), "--encoding", "bytes",
                 "--workers", "1000", "--quiet"]) == 0
    assert capsys.readouterr().err == "gpuload: warning: --workers 1000 capped at the 2 usable cores\n"


class _FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC, so the buffered bytes fail again at close()."""

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        return 0

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("full_at, named", [(prep.OWNER, "the staging directory"),
                                            ("train_000000.bin.tmp", "train_000000.bin"),
                                            ("manifest.json", "manifest.json")])
def test_full_disk_leaves_no_staging_directory(tmp_path, monkeypatch, overwrite, full_at, named):
    """Whichever write the disk fills at, the error names --out and the full disk, and --out is as it was."""
    (tmp_path / "a.txt").write_text("some text")
    out = tmp_path / "out"
    if overwrite:
        prepare([tmp_path / "a.txt"], out, encoding="bytes", workers=1)
    before = {n: (out / n).read_bytes() for n in listing(out)} if overwrite else None

    def full_open(path, mode="r", *args, **kwargs):
        if os.path.basename(path) == full_at and prep.STAGING_PREFIX in os.fspath(path):
            file = io.BufferedWriter(_FullDisk())
            return file if "b" in mode else io.TextIOWrapper(file, encoding="utf-8")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(prep, "open", full_open, raising=False)  # shadows the builtin in gpuload.prepare only
    with pytest.raises(PrepareError, match=rf"^{re.escape(str(out))}: writing {named} failed \(No space left on device\); "
                                           rf"free space or choose another --out"):
        prepare([tmp_path / "a.txt"], out, encoding="bytes", workers=1, overwrite=overwrite)
    if overwrite:
        assert {n: (out / n).read_bytes() for n in listing(out)} == before  # no staging directory among them
    else:
        assert not out.exists()  # created by the run, so removed with it
