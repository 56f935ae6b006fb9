"""tiktoken encodings by spec: a tiktoken name, the built-in `bytes`, or a `PATH.tiktoken` ranks file."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import tempfile
import threading

import numpy as np
import tiktoken

BYTES = "bytes"
ENDOFTEXT = "<|endoftext|>"

# GPT-2's pre-tokenizer regex (tiktoken's r50k/p50k form). Ranks files carry no pattern, so a
# `PATH.tiktoken` encoding splits text with this one.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""

# With no merges every byte is its own token however the text is split, so `bytes` uses the cheapest
# split: runs of up to 256 characters encode 2.3x faster than with the GPT-2 regex (38 vs 17 MB/s).
BYTES_PATTERN = r"(?s:.{1,256})"

_CACHE: dict[str, tiktoken.Encoding] = {}
_LOCK = threading.Lock()


class EncodingError(ValueError):
    """An encoding that cannot be had; the message says why and how to provide it."""


def is_path_spec(spec: str) -> bool:
    """True when `spec` names a ranks file rather than an encoding."""
    return spec.endswith(".tiktoken") or os.sep in spec or (os.altsep is not None and os.altsep in spec)


def canonical_spec(spec: str) -> str:
    """The spec worker processes and manifests should use: paths made absolute, names unchanged."""
    return os.path.abspath(spec) if is_path_spec(spec) else spec


def bytes_encoding() -> tiktoken.Encoding:
    """The 256 byte values as tokens 0..255, with the end-of-text token 256."""
    return tiktoken.Encoding(
        name=BYTES,
        pat_str=BYTES_PATTERN,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={ENDOFTEXT: 256},
    )


def read_ranks(path: str) -> dict[bytes, int]:
    """Parse a tiktoken ranks file: one `base64(token) rank` pair per line."""
    try:
        with open(path, "rb") as f:
            contents = f.read()
    except FileNotFoundError:
        raise EncodingError(
            f"encoding file {path} not found: expected a tiktoken ranks file (one 'base64-token rank' "
            f"pair per line). Check the path, or pass a tiktoken encoding name such as gpt2.") from None
    except OSError as e:
        raise EncodingError(f"encoding file {path}: cannot read it ({e.strerror}). Check its permissions.") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(contents.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            shown = line[:60].decode("utf-8", "replace")
            raise EncodingError(
                f"encoding file {path}, line {number}: expected 'base64-token rank', found {shown!r}. "
                f"Is this a tiktoken ranks file?") from None
    if not ranks:
        raise EncodingError(f"encoding file {path} holds no tokens: expected 'base64-token rank' lines.")
    missing = [i for i in range(256) if bytes([i]) not in ranks]
    if missing:
        raise EncodingError(
            f"encoding file {path} lacks {len(missing)} of the 256 single-byte tokens (first: byte {missing[0]}); "
            f"expected every byte to have a rank, or some text could not be encoded. Add them to the file.")
    if len(set(ranks.values())) != len(ranks):
        raise EncodingError(f"encoding file {path}: two tokens share a rank; expected each rank once. "
                            f"Re-create the file.")
    return ranks


def file_encoding(path: str) -> tiktoken.Encoding:
    """A user's ranks file with the GPT-2 regex and `<|endoftext|>` one past the largest rank."""
    ranks = read_ranks(path)
    name = os.path.splitext(os.path.basename(path))[0]
    return tiktoken.Encoding(name=name, pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: max(ranks.values()) + 1})


def named_encoding(name: str) -> tiktoken.Encoding:
    """tiktoken.get_encoding, with a fetch failure turned into instructions instead of a traceback."""
    known = tiktoken.list_encoding_names()
    if name not in known:
        raise EncodingError(
            f"unknown encoding {name!r}: expected {BYTES}, one of tiktoken's ({', '.join(known)}), "
            f"or a path to a .tiktoken ranks file.")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # requests, blobfile and hash checks each raise their own types
        cache = os.environ.get("TIKTOKEN_CACHE_DIR")
        default = os.path.join(tempfile.gettempdir(), "data-gym-cache")
        where = (f"TIKTOKEN_CACHE_DIR={cache} does not hold it" if cache
                 else f"tiktoken's default cache {default} does not hold it (TIKTOKEN_CACHE_DIR is not set)")
        raise EncodingError(
            f"cannot load tiktoken encoding {name!r}: its BPE file could not be fetched ({type(e).__name__}: "
            f"{str(e)[:200]}), and {where}. tiktoken downloads the file on first use and caches it. Offline: "
            f"on a machine with network run `TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; "
            f"tiktoken.get_encoding('{name}')\"`, copy DIR here and set TIKTOKEN_CACHE_DIR=DIR; or pass "
            f"--encoding PATH.tiktoken (a ranks file), or --encoding {BYTES} (needs no file).") from None


def get_encoding(spec: str) -> tiktoken.Encoding:
    """The encoding named by `spec`: `bytes`, a tiktoken name, or a path to a `.tiktoken` ranks file."""
    if not isinstance(spec, str) or not spec:
        raise EncodingError(f"encoding must be a non-empty string (a name or a .tiktoken path), got {spec!r}")
    key = canonical_spec(spec)
    if is_path_spec(spec):
        try:
            stat = os.stat(key)
            # Keyed by size and mtime too: the same path may hold another file on the next call.
            key = f"{key}\0{stat.st_size}\0{stat.st_mtime_ns}"
        except OSError:
            return file_encoding(key)  # raises the not-found / unreadable message
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    if key == BYTES:
        enc = bytes_encoding()
    elif is_path_spec(spec):
        enc = file_encoding(canonical_spec(spec))
    else:
        enc = named_encoding(key)
    with _LOCK:
        _CACHE[key] = enc
    return enc


def delimiter_token(enc: tiktoken.Encoding) -> int:
    """The end-of-text token that separates documents."""
    try:
        return enc.eot_token
    except KeyError:
        raise EncodingError(
            f"encoding {enc.name!r} has no {ENDOFTEXT} special token; expected one to delimit documents. "
            f"Use an encoding that defines it.") from None


def token_dtype(enc: tiktoken.Encoding) -> np.dtype:
    """uint16 when every token id (special ones included) fits, uint32 otherwise."""
    return np.dtype(np.uint16) if enc.n_vocab <= 1 << 16 else np.dtype(np.uint32)


def file_sha256(path: str) -> str:
    """Content hash of a ranks file, recorded so a manifest pins the exact vocabulary."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
