"""Token shards on disk: find, validate and memory-map them as one virtual token stream."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

# llm.c / modded-nanogpt shard header: 256 int32, then the tokens.
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
LLMC_FORMATS = {  # magic -> (version, token dtype)
    20240520: (1, np.dtype(np.uint16)),
    20240801: (7, np.dtype(np.uint32)),
}
LLMC_MAGIC_FOR_DTYPE = {np.dtype(np.uint16): 20240520, np.dtype(np.uint32): 20240801}
SHARD_SUFFIXES = (".bin", ".npy")
MANIFEST = "manifest.json"  # written by `gpuload prepare` beside its shards: encoding, vocabulary, counts
NPY_DTYPES = (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32))

PathLike = Union[str, os.PathLike]
HINT = "---> HINT: is this a token shard (llm.c .bin, nanoGPT raw .bin or 1-D .npy)?"


def load_manifest(directory: str) -> Optional[dict]:
    """The manifest.json of `directory`, or None when there is none or it is not valid JSON."""
    try:
        with open(os.path.join(directory, MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


class ShardError(ValueError):
    """A shard that cannot be read as tokens; the message names the file and what to do."""


def natural_key(path: str):
    """Sort key that orders `shard_2` before `shard_10`."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _is_pattern(text: str) -> bool:
    return any(ch in text for ch in "*?[")


# "train"/"val" as a word of a shard name: train_000001.bin, fineweb_val_000000.bin, shakespeare_val.bin.
_SPLIT_WORD = re.compile(r"(?:^|[_.-])(train|val)(?=[_.-]|\d|$)")


def _check_one_split(source: str, names: list[str]) -> None:
    """Refuse a directory or glob that holds both training and validation shards."""
    splits: dict[str, str] = {}
    for name in names:
        match = _SPLIT_WORD.search(os.path.basename(name))
        if match:
            splits.setdefault(match.group(1), os.path.basename(name))
    if len(splits) == 2:
        raise ValueError(
            f"{source!r} holds both training ({splits['train']}, ...) and validation ({splits['val']}, ...) shards; "
            f"reading both would train on the validation split. Name the split: a glob such as "
            f"'DIR/*train*.bin' or 'DIR/*val*.bin', or a list of files.")


def _directory_shards(directory: str, mixed_splits_ok: bool) -> list[str]:
    """The .bin/.npy files of a directory in natural order."""
    names = sorted((name for name in os.listdir(directory)
                    if name.endswith(SHARD_SUFFIXES) and os.path.isfile(os.path.join(directory, name))),
                   key=natural_key)
    if not names:
        raise FileNotFoundError(f"directory {directory!r} holds no shard files (expected names ending in .bin or .npy)")
    if not mixed_splits_ok:
        _check_one_split(directory, names)
    return [os.path.join(directory, n) for n in names]


def _glob_shards(pattern: str, mixed_splits_ok: bool) -> list[str]:
    """The .bin/.npy files a glob matches, in natural order (other files, e.g. meta.pkl, are not tokens)."""
    files = [p for p in glob.glob(pattern) if os.path.isfile(p)]
    if not files:
        raise FileNotFoundError(f"no files match the pattern {pattern!r}: check the path, and quote the pattern so "
                                f"that the shell passes it to gpuload unexpanded")
    matches = sorted((p for p in files if p.endswith(SHARD_SUFFIXES)), key=natural_key)
    if not matches:
        raise FileNotFoundError(f"the pattern {pattern!r} matches {len(files)} files, but none ends in .bin or .npy "
                                f"(e.g. {os.path.basename(files[0])})")
    if not mixed_splits_ok:
        _check_one_split(pattern, matches)
    return matches


def resolve_paths(files: Union[PathLike, Iterable[PathLike]], mixed_splits_ok: bool = False) -> list[str]:
    """Expand a path, a glob, a directory, or a list of these into an ordered list of shard files.

    A directory or glob holding both train and val shards is refused unless `mixed_splits_ok` (for
    listing them); explicitly named files are taken as given.
    """
    items = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not items:
        raise FileNotFoundError("no shard files given: pass a path, a glob, a directory or a list of paths")
    paths: list[str] = []
    for item in items:
        text = os.fspath(item)
        if os.path.isfile(text):  # before the glob test: a real file may have '[' in its name
            paths.append(text)
        elif os.path.isdir(text):
            paths.extend(_directory_shards(text, mixed_splits_ok))
        elif _is_pattern(text):
            paths.extend(_glob_shards(text, mixed_splits_ok))
        else:
            raise FileNotFoundError(f"no such shard file or directory: {text!r}; check the path")
    return paths


@dataclass(frozen=True)
class Shard:
    """One validated shard: where its tokens start in the file and how many there are."""

    path: str
    format: str  # "llmc" | "raw" | "npy"
    dtype: np.dtype
    offset: int  # byte offset of the first token
    num_tokens: int

    def memmap(self) -> np.ndarray:
        return np.memmap(self.path, dtype=self.dtype, mode="r", offset=self.offset, shape=(self.num_tokens,))


def _read_llmc_header(path: str, head: bytes, size: int) -> Shard | None:
    """Return the shard if `head` starts with an llm.c header, None if it is no llm.c file at all."""
    if len(head) < 4:
        return None
    magic = int(np.frombuffer(head[:4], dtype="<i4")[0])
    if magic not in LLMC_FORMATS:
        return None
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: llm.c shard (magic {magic}) is truncated: expected a {HEADER_BYTES}-byte header, "
            f"found only {size} bytes. Re-create the shard.")
    header = np.frombuffer(head[:HEADER_BYTES], dtype="<i4")
    version, dtype = LLMC_FORMATS[magic]
    if int(header[1]) != version:
        raise ShardError(
            f"{path}: llm.c shard with magic {magic} must be version {version}, found version "
            f"{int(header[1])}. {HINT}")
    count = int(header[2])
    available = (size - HEADER_BYTES) // dtype.itemsize
    if count <= 0:
        raise ShardError(f"{path}: llm.c header says {count} tokens; expected at least 1. Re-create the shard.")
    if count > available:
        raise ShardError(
            f"{path}: truncated llm.c shard: header says {count} tokens, the file holds only {available} "
            f"({size} bytes). Re-download or re-create this shard.")
    if size != HEADER_BYTES + count * dtype.itemsize:
        raise ShardError(
            f"{path}: llm.c header says {count} tokens ({HEADER_BYTES + count * dtype.itemsize} bytes in all), "
            f"but the file has {size} bytes. The shard is corrupt or was written by another tool: re-create it.")
    return Shard(path, "llmc", dtype, HEADER_BYTES, count)


def open_shard(path: str, token_dtype=np.uint16) -> Shard:
    """Validate one shard file and describe where its tokens are. `token_dtype` applies to raw .bin only."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(f"{path}: cannot read the shard ({e.strerror}). Check that the file exists and is readable.") from e
    if size == 0:
        raise ShardError(f"{path}: the file is empty; expected token data. Remove it or re-create the shard.")

    if path.endswith(".npy"):
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # numpy raises several types for a bad header
            raise ShardError(f"{path}: not a readable .npy file ({e}). {HINT}") from e
        if array.ndim != 1:
            raise ShardError(f"{path}: expected a 1-D token array, found shape {array.shape}. Flatten it with array.reshape(-1).")
        if array.dtype.byteorder == ">":
            raise ShardError(f"{path}: expected little-endian tokens, found big-endian {array.dtype}. Re-save it with "
                             f"np.save(path, array.astype(array.dtype.newbyteorder('<'))).")
        if array.dtype not in NPY_DTYPES:
            raise ShardError(
                f"{path}: expected tokens of dtype uint16, uint32 or int32, found {array.dtype}. "
                f"Convert with array.astype(np.uint32).")
        if array.size == 0:
            raise ShardError(f"{path}: the array holds no tokens. Remove the file.")
        # Token ids are never negative, so int32 tokens read as uint32 keep their values (not checked: a scan
        # of the whole file per open would cost seconds per GB).
        dtype = np.dtype(np.uint32) if array.dtype == np.int32 else array.dtype
        return Shard(path, "npy", dtype, int(array.offset), int(array.size))

    shard = _read_llmc_header(path, head, size)
    if shard is not None:
        return shard
    dtype = np.dtype(token_dtype)
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise ValueError(f"token_dtype must be uint16 or uint32, got {dtype}")
    if size % dtype.itemsize:
        raise ShardError(
            f"{path}: a raw token file of {dtype} must have a size that is a multiple of {dtype.itemsize} "
            f"bytes, found {size} bytes. The file is truncated, or its tokens have another width "
            f"(pass token_dtype=).")
    return Shard(path, "raw", dtype, 0, size // dtype.itemsize)


class TokenStream:
    """The shards concatenated in order, memory-mapped, addressed by a global token position."""

    def __init__(self, files, token_dtype=np.uint16):
        self.paths = resolve_paths(files)
        self.shards = [open_shard(p, token_dtype) for p in self.paths]
        widths: dict[np.dtype, list[Shard]] = {}
        for shard in self.shards:
            widths.setdefault(shard.dtype, []).append(shard)
        if len(widths) > 1:
            found = "; ".join(f"{len(group)} of {dtype} (first: {group[0].path})" for dtype, group in widths.items())
            raw = any(s.format == "raw" for s in self.shards)
            raise ShardError(
                f"shards mix token widths: {found}. Expected one width for the whole stream: re-create the shards "
                f"with one tokenizer/format" + (", or pass token_dtype=np.uint32 for raw uint32 .bin files." if raw else "."))
        self.dtype = self.shards[0].dtype
        self.arrays = [s.memmap() for s in self.shards]
        counts = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        # starts[i] = global position of shard i's first token; starts[-1] = total tokens.
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self._files: dict[int, object] = {}  # shard index -> unbuffered file for read_into, opened on first use

    def __len__(self) -> int:
        return self.num_tokens

    def _pieces(self, start: int, count: int):
        """(shard index, first token in the shard, tokens, offset in the output) covering [start, start+count)."""
        if start < 0 or count < 0 or start > self.num_tokens or count > self.num_tokens - start:
            raise IndexError(f"tokens [{start}, {start + count}) outside the stream of {self.num_tokens}")
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < count:
            local = start + done - int(self.starts[shard])
            take = min(count - done, self.shards[shard].num_tokens - local)
            yield shard, local, take, done
            done += take
            shard += 1

    def read(self, start: int, count: int) -> np.ndarray:
        """Tokens [start, start+count) of the stream from the memmaps, copied across shard boundaries."""
        out = np.empty(count, dtype=self.dtype)
        for shard, local, take, done in self._pieces(start, count):
            out[done:done + take] = self.arrays[shard][local:local + take]
        return out

    def read_into(self, out: np.ndarray, start: int) -> None:
        """Tokens [start, start+len(out)) into `out` (1-D, stream dtype) by pread on the files, not the memmap.

        A shard truncated under a memmap turns the next read into SIGBUS, which kills the process; pread
        returns a short count, reported here as OSError. The files are opened on first use and kept open
        (until close()), so a shard deleted or replaced after that still reads its original content.
        """
        if not isinstance(out, np.ndarray) or out.ndim != 1 or out.dtype != self.dtype:
            found = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"read_into: expected a 1-D {self.dtype} array, found {found}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("read_into: `out` must be C-contiguous and writeable; pass np.empty(n, dtype=stream.dtype)")
        view = memoryview(out).cast("B")
        itemsize = self.dtype.itemsize
        for shard, local, take, done in self._pieces(start, out.size):
            info = self.shards[shard]
            f = self._files.get(shard)
            if f is None:
                try:
                    f = self._files.setdefault(shard, open(info.path, "rb", buffering=0))
                except OSError as e:
                    raise type(e)(e.errno, f"{info.path}: cannot open the shard ({e.strerror}); it was moved or "
                                           f"deleted since the stream was opened. Restore it, or reopen the stream.") from e
            first = info.offset + local * itemsize
            want = take * itemsize
            got = 0
            while got < want:  # os.preadv fills `out` in place and releases the GIL; a read may come back short
                try:
                    n = os.preadv(f.fileno(), [view[done * itemsize + got:(done + take) * itemsize]], first + got)
                except OSError as e:
                    raise type(e)(e.errno, f"{info.path}: read failed at byte offset {first + got}: expected {want} "
                                           f"bytes from offset {first}, got {got} ({e.strerror}). Check the disk "
                                           f"(dmesg) and restore the shard, then restart from the last checkpoint.") from e
                if n == 0:
                    size = os.fstat(f.fileno()).st_size
                    raise OSError(
                        f"{info.path}: unexpected end of file at byte offset {first + got}: expected {want} bytes "
                        f"from offset {first}, got {got}; the file now holds {size} bytes, the stream expects "
                        f"{info.offset + info.num_tokens * itemsize}. The shard was truncated or changed while "
                        f"training: restore it (or re-create it with the same content) and restart from the last "
                        f"checkpoint.")
                got += n

    def advise(self, start: int, count: int) -> None:
        """Tell the kernel that tokens [start, start+count) will be read soon (readahead); a hint, never fails."""
        if not hasattr(os, "posix_fadvise"):
            return
        itemsize = self.dtype.itemsize
        for shard, local, take, _ in self._pieces(start, count):
            info = self.shards[shard]
            try:
                f = self._files.get(shard) or self._files.setdefault(shard, open(info.path, "rb", buffering=0))
                os.posix_fadvise(f.fileno(), info.offset + local * itemsize, take * itemsize, os.POSIX_FADV_WILLNEED)
            except OSError:
                return  # the read that follows reports a missing or unreadable shard with its own message

    def close(self) -> None:
        """Close the files read_into opened (the memmaps go when the stream is dropped)."""
        files, self._files = self._files, {}
        for f in files.values():
            f.close()

    def vocabulary(self) -> Optional[tuple[str, int, str]]:
        """(encoding name, vocabulary size, manifest path) from the `gpuload prepare` manifest beside the shards.

        None when no shard directory holds a manifest (shards from elsewhere carry no vocabulary).
        """
        for directory in dict.fromkeys(os.path.dirname(os.path.abspath(p)) for p in self.paths):
            manifest = load_manifest(directory)
            if manifest is not None and "encoding_name" in manifest and "vocab_size" in manifest:
                return manifest["encoding_name"], manifest["vocab_size"], os.path.join(directory, MANIFEST)
        return None

    def fingerprint(self) -> str:
        """A short identity of the dataset: shard names, sizes, width and sampled tokens (cheap to compute)."""
        h = hashlib.sha256()
        h.update(str(self.dtype).encode())
        for shard, array in zip(self.shards, self.arrays):
            h.update(f"{os.path.basename(shard.path)}:{shard.num_tokens};".encode())
            h.update(np.ascontiguousarray(array[:64]).tobytes())
            h.update(np.ascontiguousarray(array[-64:]).tobytes())
        return h.hexdigest()[:16]


def llmc_header(dtype, count: int) -> bytes:
    """The 1024-byte llm.c header for `count` tokens of `dtype` (uint16: v1, uint32: v7)."""
    magic = LLMC_MAGIC_FOR_DTYPE[np.dtype(dtype)]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, LLMC_FORMATS[magic][0], count
    return header.tobytes()


def write_shard(path: PathLike, tokens: np.ndarray, format: str = "llmc") -> None:
    """Write tokens as an llm.c shard (format="llmc"), a headerless .bin ("raw") or a .npy ("npy").

    The file appears under its final name only when complete (written to a temporary name first).
    """
    tokens = np.ascontiguousarray(tokens)
    if tokens.ndim != 1 or tokens.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32)):
        raise ValueError(f"tokens must be a 1-D uint16/uint32/int32 array, got {tokens.dtype} {tokens.shape}")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            if format == "llmc":
                dtype = np.dtype(np.uint16) if tokens.dtype == np.uint16 else np.dtype(np.uint32)
                f.write(llmc_header(dtype, tokens.size))
                f.write(tokens.astype(dtype.newbyteorder("<"), copy=False).tobytes())
            elif format == "raw":
                f.write(tokens.tobytes())
            elif format == "npy":
                np.save(f, tokens)
            else:
                raise ValueError(f"unknown shard format {format!r}; expected 'llmc', 'raw' or 'npy'")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)

