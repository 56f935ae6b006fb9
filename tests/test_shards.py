"""Shard formats, input resolution, and every bad input failing with a clear error."""

import os

import numpy as np
import pytest
import torch

from gpuload import GPULoader
from gpuload.shards import (HEADER_BYTES, ShardError, TokenStream, load_manifest, natural_key, open_shard,
                            resolve_paths, write_shard)

from conftest import position_tokens


@pytest.mark.parametrize("format,dtype", [
    ("llmc", np.uint16), ("llmc", np.uint32), ("raw", np.uint16), ("raw", np.uint32),
    ("npy", np.uint16), ("npy", np.uint32), ("npy", np.int32),
])
def test_formats_read_back_exactly(tmp_path, format, dtype):
    tokens = position_tokens(0, 70_001, dtype)
    path = str(tmp_path / ("t.npy" if format == "npy" else "t.bin"))
    write_shard(path, tokens, format=format)
    stream = TokenStream(path, token_dtype=dtype if format == "raw" else np.uint16)
    shard = stream.shards[0]
    assert shard.format == format and shard.num_tokens == tokens.size
    assert stream.dtype.itemsize == np.dtype(dtype).itemsize
    np.testing.assert_array_equal(stream.read(0, tokens.size), tokens.astype(stream.dtype))


def test_llmc_header_layout(tmp_path):
    path = tmp_path / "a.bin"
    write_shard(path, np.arange(10, dtype=np.uint32))
    header = np.fromfile(path, dtype="<i4", count=256)
    assert header[:3].tolist() == [20240801, 7, 10] and not header[3:].any()
    assert os.path.getsize(path) == HEADER_BYTES + 40
    write_shard(path, np.arange(10, dtype=np.uint16))
    assert np.fromfile(path, dtype="<i4", count=3).tolist() == [20240520, 1, 10]


def test_stream_concatenates_in_natural_order(make_shards, tmp_path):
    sizes = [5, 3, 8, 1, 2, 9, 4, 6, 7, 2, 11, 3]  # 12 shards: shard_10 and shard_11 sort after shard_9
    make_shards(sizes)
    stream = TokenStream(str(tmp_path / "shard_*.bin"))
    assert [os.path.basename(p) for p in stream.paths] == [f"shard_{i}.bin" for i in range(12)]
    np.testing.assert_array_equal(stream.read(0, sum(sizes)), np.arange(sum(sizes)))
    np.testing.assert_array_equal(stream.read(4, 10), np.arange(4, 14))  # crosses three shards
    assert TokenStream(str(tmp_path)).paths == stream.paths  # a directory, same order
    assert TokenStream(list(reversed(stream.paths))).read(0, 3).tolist() == [sum(sizes) - 3, sum(sizes) - 2, sum(sizes) - 1]


def test_natural_key():
    names = ["s_10.bin", "s_2.bin", "s_1.bin", "t_0.bin"]
    assert sorted(names, key=natural_key) == ["s_1.bin", "s_2.bin", "s_10.bin", "t_0.bin"]


def test_fingerprint_tracks_content_and_order(make_shards, tmp_path):
    paths = make_shards([100, 200])
    assert TokenStream(paths).fingerprint() == TokenStream(paths).fingerprint()
    assert TokenStream(paths).fingerprint() != TokenStream(paths[::-1]).fingerprint()
    other = make_shards([100, 200], prefix="other", directory=str(tmp_path / "o"))
    write_shard(other[1], np.full(200, 7, dtype=np.uint32))
    assert TokenStream(paths).fingerprint() != TokenStream([paths[0], other[1]]).fingerprint()


# --- bad input: every case names the file and raises the documented type -----------------------

def test_no_match_names_the_pattern(tmp_path):
    pattern = str(tmp_path / "missing_*.bin")
    with pytest.raises(FileNotFoundError, match="missing_.*quote the pattern"):
        resolve_paths(pattern)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        resolve_paths(str(tmp_path / "nope.bin"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        resolve_paths(str(tmp_path / "empty_dir"))
    with pytest.raises(FileNotFoundError):
        resolve_paths([])


def _expect_shard_error(path, *fragments, **kwargs):
    with pytest.raises(ShardError) as info:
        open_shard(str(path), **kwargs)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    assert isinstance(info.value, ValueError)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    _expect_shard_error(path, "empty")


def test_truncated_llmc_shard(tmp_path):
    path = tmp_path / "trunc.bin"
    write_shard(path, np.arange(1000, dtype=np.uint16))
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    _expect_shard_error(path, "truncated", "header says 1000 tokens", "950")


def test_truncated_inside_header(tmp_path):
    path = tmp_path / "hdr.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    path.write_bytes(path.read_bytes()[:500])
    _expect_shard_error(path, "truncated", "1024-byte header")


def test_llmc_wrong_version_and_trailing_bytes(tmp_path):
    path = tmp_path / "v.bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    raw = bytearray(path.read_bytes())
    raw[4:8] = np.int32(7).tobytes()
    path.write_bytes(bytes(raw))
    _expect_shard_error(path, "version 1", "found version 7")
    write_shard(path, np.arange(10, dtype=np.uint16))
    path.write_bytes(path.read_bytes() + b"\0\0\0\0")
    _expect_shard_error(path, "header says 10 tokens", "re-create")


def test_raw_size_not_multiple_of_width(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03")
    _expect_shard_error(path, "multiple of 2", "5 bytes")
    path.write_bytes(b"\x01\x00\x02\x00\x03\x00")
    _expect_shard_error(path, "multiple of 4", token_dtype=np.uint32)


def test_bad_npy(tmp_path):
    path = tmp_path / "two_d.npy"
    np.save(path, np.zeros((3, 4), dtype=np.uint16))
    _expect_shard_error(path, "1-D", "(3, 4)")
    np.save(path, np.zeros(8, dtype=np.float32))
    _expect_shard_error(path, "uint16, uint32 or int32", "float32")
    np.save(path, np.zeros(8, dtype=">u2"))
    _expect_shard_error(path, "little-endian", "newbyteorder")
    path.write_bytes(b"not a numpy file at all")
    _expect_shard_error(path, ".npy")


def test_mixed_widths_name_the_odd_shard(make_shards, tmp_path):
    a = make_shards([100] * 10, dtype=np.uint16, prefix="a")
    b = make_shards([100], dtype=np.uint32, prefix="b")
    with pytest.raises(ShardError, match="mix token widths") as info:
        TokenStream(a + b)
    message = str(info.value)
    assert "10 of uint16 (first: " in message and "a_0.bin" in message
    assert "1 of uint32 (first: " in message and "b_0.bin" in message


def test_too_few_tokens_for_one_window(make_shards):
    paths = make_shards([10, 6])
    with pytest.raises(ValueError, match="seq_len \\+ 1 = 17") as info:
        GPULoader(paths, batch_size=1, seq_len=16, device="cpu")
    assert "shard_0.bin" in str(info.value)
    GPULoader(paths, batch_size=1, seq_len=15, device="cpu")  # exactly seq_len + 1 tokens is enough


def test_file_name_with_glob_characters(tmp_path):
    path = tmp_path / "data[1].bin"
    write_shard(path, np.arange(10, dtype=np.uint16))
    assert resolve_paths(str(path)) == [str(path)]


def test_directory_with_train_and_val_splits_is_refused(tmp_path):
    write_shard(tmp_path / "train_000000.bin", np.arange(100, dtype=np.uint16))
    write_shard(tmp_path / "val_000000.bin", np.arange(100, dtype=np.uint16))
    with pytest.raises(ValueError, match="both training \\(train_000000.bin, ...\\) and validation"):
        resolve_paths(str(tmp_path))
    assert resolve_paths(str(tmp_path / "train_*.bin")) == [str(tmp_path / "train_000000.bin")]
    assert len(resolve_paths(str(tmp_path), mixed_splits_ok=True)) == 2  # for listing (gpuload inspect)


@pytest.mark.parametrize("train,val", [
    ("fineweb_train_000001.bin", "fineweb_val_000000.bin"),  # llm.c / modded-nanogpt names
    ("tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"),
])
def test_glob_or_directory_mixing_splits_is_refused(tmp_path, train, val):
    for name in (train, val):
        write_shard(tmp_path / name, np.arange(100, dtype=np.uint16))
    for source in (str(tmp_path), str(tmp_path / "*.bin")):
        with pytest.raises(ValueError, match="validation"):
            resolve_paths(source)
    assert resolve_paths([str(tmp_path / train), str(tmp_path / val)])  # named one by one: the user's choice
    write_shard(tmp_path / "interval_3.bin", np.arange(10, dtype=np.uint16))  # "val" inside a word is no split
    assert resolve_paths(str(tmp_path / "int*.bin")) == [str(tmp_path / "interval_3.bin")]


def test_glob_skips_files_that_are_not_shards(tmp_path):
    write_shard(tmp_path / "shard_0.bin", np.arange(100, dtype=np.uint16))
    (tmp_path / "meta.pkl").write_bytes(b"\x80\x04not tokens")
    assert resolve_paths(str(tmp_path / "*")) == [str(tmp_path / "shard_0.bin")]
    with pytest.raises(FileNotFoundError, match="none ends in .bin or .npy"):
        resolve_paths(str(tmp_path / "*.pkl"))


# Manifests beside the shards that do not hold what gpuload prepare writes, and the field each fault is in.
MALFORMED_MANIFESTS = [
    ('{"encoding_name": ["x"], "vocab_size": "big"}', "field 'encoding_name': expected a string, found an array"),
    ('{"encoding_name": "gpt2", "vocab_size": 0}', "field 'vocab_size': expected a whole number >= 1, found a number"),
    ("[" * 100_000 + "]" * 100_000, r"not valid JSON \(nested too deeply to parse\)"),  # json: RecursionError
    ('{"encoding_name": "gpt2", ', r"not valid JSON \(Expecting property name"),
    ("[1, 2]", r"expected a JSON object, found an array"),
]


@pytest.mark.parametrize("text, fault", MALFORMED_MANIFESTS)
def test_malformed_manifest_is_ignored_with_a_warning(tmp_path, text, fault):
    write_shard(tmp_path / "train_000000.bin", position_tokens(0, 1000, np.uint16))
    (tmp_path / "manifest.json").write_text(text)
    where = rf"{tmp_path / 'manifest.json'}: malformed manifest: {fault}"
    with pytest.raises(ShardError, match=where + r".*Re-run gpuload prepare"):
        load_manifest(str(tmp_path), strict=True)
    with pytest.warns(UserWarning, match=where + r".*Ignored: the tokens come from the shards alone"):
        assert TokenStream(str(tmp_path)).vocabulary() is None


@pytest.mark.parametrize("text, fault", MALFORMED_MANIFESTS[:3])
def test_loader_reads_shards_beside_a_malformed_manifest(tmp_path, text, fault):
    """The tokens do not depend on the manifest: a mixture (which compares vocabularies) still loads."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_shard(tmp_path / name / "train_000000.bin", position_tokens(0, 1000, np.uint16))
    (tmp_path / "a" / "manifest.json").write_text(text)
    (tmp_path / "b" / "manifest.json").write_text('{"encoding_name": "gpt2", "vocab_size": 50257}')
    with pytest.warns(UserWarning, match=rf"a/manifest.json: malformed manifest: {fault}"):
        loader = GPULoader({"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}, weights={"a": 1, "b": 1},
                           batch_size=2, seq_len=8, sampling="sequential", device="cpu")
    x, y = next(loader)
    loader.close()
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    single = GPULoader(str(tmp_path / "a"), batch_size=2, seq_len=8, sampling="sequential", device="cpu")
    assert next(single)[0].shape == (2, 8)
    single.close()
