"""Token shards on disk: find, validate and memory-map them as one virtual token stream."""

from __future__ import annotations

import ctypes
import errno
import glob
import hashlib
import io
import json
import mmap
import os
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional, Union

import numpy as np

from gpuload import native

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


def load_manifest(directory: str, strict: bool = False) -> Optional[dict]:
    """The manifest.json of `directory`, or None when there is none.

    A manifest that cannot be read, is not JSON, or gives a field that gpuload reads (the vocabulary
    for mixtures, the encoding, delimiter and counts for `gpuload inspect`) the wrong type is malformed:
    with `strict` that raises a ShardError naming the file and the field; otherwise it is ignored with
    a warning, since the tokens come from the shards alone.
    """
    import reprlib
    import warnings

    path = os.path.join(directory, MANIFEST)

    def shown(value) -> str:
        kinds = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
                 list: "an array", dict: "an object"}
        return f"{kinds.get(type(value), type(value).__name__)} ({reprlib.repr(value)})"

    def whole(value, low: int, high: Optional[int] = None) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool) and value >= low
                and (high is None or value <= high))

    def problems(manifest) -> list[str]:
        if not isinstance(manifest, dict):
            return [f"expected a JSON object, found {shown(manifest)}"]
        found = []
        fields = {  # field -> (check, what is expected)
            "encoding": (lambda v: isinstance(v, str), "a string"),
            "encoding_name": (lambda v: isinstance(v, str), "a string"),
            "vocab_size": (lambda v: whole(v, 1), "a whole number >= 1"),
            "token_dtype": (lambda v: isinstance(v, str), "a string"),
            "tokens": (lambda v: whole(v, 0), "a whole number >= 0"),
            "delimiter": (lambda v: isinstance(v, dict), "an object"),
            "delimiter.token": (lambda v: whole(v, 0, 2**32 - 1), "a token id (a whole number >= 0)"),
            "delimiter.placement": (lambda v: v in ("eos", "bos"), "'eos' or 'bos'"),
            "shards": (lambda v: isinstance(v, list), "an array"),
        }
        for name, (check, expected) in fields.items():
            parent, _, key = name.rpartition(".")
            holder = manifest.get(parent) if parent else manifest
            if isinstance(holder, dict) and key in holder and not check(holder[key]):
                found.append(f"field {name!r}: expected {expected}, found {shown(holder[key])}")
        for i, entry in enumerate(manifest.get("shards") if isinstance(manifest.get("shards"), list) else []):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                found.append(f"field 'shards[{i}]': expected an object with a 'file' name, found {shown(entry)}")
                break
            bad = [key for key in ("tokens", "documents") if key in entry and not whole(entry[key], 0)]
            if bad:
                found.append(f"field 'shards[{i}].{bad[0]}': expected a whole number >= 0, found {shown(entry[bad[0]])}")
                break  # one bad entry is enough to tell the manifest is damaged
        return found

    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return None
    except OSError as e:
        found = [f"cannot read it ({e.strerror or e})"]
    except RecursionError:  # json recurses once per nesting level: "[" * 100000 overflows the stack
        found = ["not valid JSON (nested too deeply to parse)"]
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        found = [f"not valid JSON ({getattr(e, 'msg', e)}{where})"]
    else:
        found = problems(manifest)
        if not found:
            return manifest
    message = f"{path}: malformed manifest: {'; '.join(found)}"
    fix = "Re-run gpuload prepare to write it again, or remove it"
    if strict:
        raise ShardError(f"{message}. {fix}.")
    warnings.warn(f"gpuload: {message}. Ignored: the tokens come from the shards alone. {fix}.", stacklevel=2)
    return None


class ShardError(ValueError):
    """A shard that cannot be read as tokens; the message names the file and what to do."""


class ShardChanged(OSError):
    """A shard that changed after the loader opened it (truncated, grown or rewritten): the message names the
    file, the change, and the first step that may be affected."""


@dataclass(frozen=True)
class FileIdentity:
    """What identifies a shard file as opened (device, inode) and what must stay as it was (size, mtime)."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)

    def change(self, path: str, fd: Optional[int] = None) -> str:
        """'' while the shard is as opened; else how it changed. Same rule as csrc/watch.cpp: by the descriptor
        `fd` of the opened file if there is one (exact), else by the absolute `path`, where a name that now holds
        another file (or none) counts as unchanged, the loader's map holding the original pages."""
        try:
            st = os.fstat(fd) if fd is not None else os.stat(path)
        except OSError:
            return ""
        if fd is None and (st.st_dev, st.st_ino) != (self.device, self.inode):
            return ""
        what = []
        if st.st_size != self.size:
            what.append(f"{'truncated' if st.st_size < self.size else 'grown'} from {self.size} to {st.st_size} bytes")
        if st.st_mtime_ns != self.mtime_ns:
            what.append("modified (its mtime changed)")
        return ", ".join(what)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_MAP_FAILED = ctypes.c_void_p(-1).value


class FileMap:
    """A read-only shared map of a whole file that keeps no descriptor open.

    numpy's memmap (Python's mmap) keeps a duplicate descriptor per map, so 1,000 shards would hold 1,000
    descriptors against a common limit of 1,024. numpy arrays view this map through __array_interface__
    and keep it alive; it is unmapped when the last view goes.
    """

    def __init__(self, fd: int, size: int, path: str):
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address is None or address == _MAP_FAILED:
            code = ctypes.get_errno()
            raise OSError(code, f"{path}: cannot memory-map the shard ({os.strerror(code)})")
        self.address, self.size = address, size
        self.__array_interface__ = {"shape": (size,), "typestr": "|u1", "data": (address, True), "version": 3}

    def advise_willneed(self, offset: int, length: int) -> None:
        """Ask the kernel to read bytes [offset, offset+length) ahead (a hint: errors are ignored)."""
        first = offset // mmap.PAGESIZE * mmap.PAGESIZE
        _libc.madvise(self.address + first, min(self.size - first, length + offset - first), mmap.MADV_WILLNEED)

    def __del__(self):
        if getattr(self, "address", None):
            _libc.munmap(self.address, self.size)
            self.address = None


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


def _not_a_file(path: str) -> Optional[Exception]:
    """The error for a path that names something other than a regular file or a directory (a dangling symlink,
    a symlink loop, a FIFO, a socket, a device), or None when it names a file, a directory or nothing."""
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return FileNotFoundError(f"{path!r} is a symlink loop (a link that leads back to itself); point it at a "
                                     f"shard file or remove it")
        if os.path.islink(path):
            return FileNotFoundError(f"{path!r} is a dangling symlink to {os.readlink(path)!r}, which does not exist; "
                                     f"restore its target or remove the link")
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        return ShardError(f"{path!r}: cannot read it ({e.strerror}); check its permissions")
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
    return ShardError(f"{path!r} is {kind}; a shard must be a regular file (llm.c .bin, raw .bin or 1-D .npy)")


def _check_shard_names(paths: list[str]) -> None:
    """Refuse shard-named entries that cannot be files: a dangling link among the shards would drop a shard silently."""
    for path in paths:
        error = _not_a_file(path)
        if error is not None:
            raise error


def _directory_shards(directory: str, mixed_splits_ok: bool) -> list[str]:
    """The .bin/.npy files of a directory in natural order."""
    entries = [os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(SHARD_SUFFIXES)]
    _check_shard_names(entries)
    names = sorted((os.path.basename(p) for p in entries if os.path.isfile(p)), key=natural_key)
    if not names:
        raise FileNotFoundError(f"directory {directory!r} holds no shard files (expected names ending in .bin or .npy)")
    if not mixed_splits_ok:
        _check_one_split(directory, names)
    return [os.path.join(directory, n) for n in names]


def _glob_shards(pattern: str, mixed_splits_ok: bool) -> list[str]:
    """The .bin/.npy files a glob matches, in natural order (other files, e.g. meta.pkl, are not tokens)."""
    matched = glob.glob(pattern)
    _check_shard_names([p for p in matched if p.endswith(SHARD_SUFFIXES)])
    files = [p for p in matched if os.path.isfile(p)]
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
    expected = "a path, a glob, a directory or a list of these (str or os.PathLike)"
    if isinstance(files, (str, bytes, os.PathLike)):
        items = [files]
    elif isinstance(files, Iterable) and not isinstance(files, dict):
        items = list(files)
    else:
        raise ValueError(f"files must be {expected}, got {type(files).__name__} {files!r}")
    if not items:
        raise FileNotFoundError("no shard files given: pass a path, a glob, a directory or a list of paths")
    for item in items:
        if not isinstance(item, (str, bytes, os.PathLike)):
            raise ValueError(f"files must be {expected}; the list holds {type(item).__name__} {item!r}")
    paths: list[str] = []
    for item in items:
        text = os.fsdecode(item)
        if os.path.isfile(text):  # before the glob test: a real file may have '[' in its name
            paths.append(text)
        elif os.path.isdir(text):
            paths.extend(_directory_shards(text, mixed_splits_ok))
        elif (error := _not_a_file(text)) is not None:
            raise error
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
    identity: Optional[FileIdentity] = None  # the file as opened
    signed: bool = False  # int32 .npy tokens: read as uint32, so they must be non-negative (TokenStream checks)

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


def _open_error(path: str, e: OSError) -> Exception:
    if e.errno in (errno.EMFILE, errno.ENFILE):
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        held = (f"with the native extension gpuload keeps a descriptor per shard only for streams of at most "
                f"{soft // 8} shards" if native.available() else "without the native extension gpuload keeps one "
                "descriptor per shard (install it with a C++ compiler present: pip install -e .)")
        raise_it = (f"Raise the limit with `ulimit -n {hard}` in the launching shell (or resource.setrlimit)"
                    if hard > soft else "Ask for a higher hard limit (ulimit -Hn; /etc/security/limits.conf)")
        return OSError(e.errno, f"{path}: cannot open the shard: too many open files in this process (limit "
                                f"{soft}, hard limit {hard}; {held}). {raise_it}, or close files the process holds.")
    return _not_a_file(path) or ShardError(
        f"{path}: cannot read the shard ({e.strerror}). Check that the file exists and is readable.")


def _open_file(path: str) -> tuple[int, os.stat_result]:
    """A read-only descriptor of the regular file `path`, and its status as opened."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO must not hang
    except OSError as e:
        raise _open_error(path, e) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(path) or ShardError(f"{path!r} is not a regular file; a shard must be one")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _describe_npy(path: str, fd: int, size: int) -> Shard:
    head = io.BytesIO(os.pread(fd, min(size, 1 << 16), 0))
    try:
        version = np.lib.format.read_magic(head)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(head)
    except Exception as e:  # numpy raises several types for a bad header
        raise ShardError(f"{path}: not a readable .npy file ({e}). {HINT}") from e
    if len(shape) != 1:
        raise ShardError(f"{path}: expected a 1-D token array, found shape {shape}. Flatten it with array.reshape(-1).")
    if dtype.byteorder == ">":
        raise ShardError(f"{path}: expected little-endian tokens, found big-endian {dtype}. Re-save it with "
                         f"np.save(path, array.astype(array.dtype.newbyteorder('<'))).")
    if dtype not in NPY_DTYPES:
        raise ShardError(f"{path}: expected tokens of dtype uint16, uint32 or int32, found {dtype}. "
                         f"Convert with array.astype(np.uint32).")
    count, offset = shape[0], head.tell()
    if count == 0:
        raise ShardError(f"{path}: the array holds no tokens. Remove the file.")
    if size < offset + count * dtype.itemsize:
        raise ShardError(f"{path}: truncated .npy file: its header says {count} tokens of {dtype} "
                         f"({offset + count * dtype.itemsize} bytes in all), the file has {size} bytes. Re-create it.")
    signed = dtype == np.int32
    return Shard(path, "npy", np.dtype(np.uint32) if signed else np.dtype(dtype), offset, count, signed=signed)


def _unknown_llmc_header(path: str, head: bytes, size: int) -> Optional[ShardError]:
    """An error for a .bin whose first 1 KiB reads as an llm.c header gpuload does not know (a date-like
    magic, a small version, a token count that matches the file size), which a raw read would take as tokens."""
    if len(head) < HEADER_BYTES:
        return None
    magic, version, count = (int(v) for v in np.frombuffer(head[:12], dtype="<i4"))
    widths = [w for w in (2, 4) if count > 0 and size == HEADER_BYTES + count * w]
    if not (20_000_000 <= magic < 21_000_000 and 0 < version < 1000 and widths):
        return None
    known = ", ".join(f"{m} (version {v}, {d})" for m, (v, d) in LLMC_FORMATS.items())
    return ShardError(
        f"{path}: the file starts like an llm.c shard header (magic {magic}, version {version}, {count} tokens of "
        f"{widths[0]} bytes, matching its size), but that magic is not one gpuload knows: {known}. Read as raw "
        f"tokens, the header would become tokens. Re-create the shard with a known header "
        f"(gpuload.shards.write_shard) or strip the {HEADER_BYTES}-byte header to make it a raw shard.")


def _describe(path: str, fd: int, st: os.stat_result, token_dtype) -> Shard:
    """The shard in the open file `fd` (status `st`): its format, width and where its tokens are."""
    size = st.st_size
    if size == 0:
        raise ShardError(f"{path}: the file is empty; expected token data. Remove it or re-create the shard.")
    if path.endswith(".npy"):
        shard = _describe_npy(path, fd, size)
    else:
        head = os.pread(fd, HEADER_BYTES, 0)
        if head.startswith(b"\x93NUMPY"):
            raise ShardError(f"{path}: this is a .npy file (it starts with numpy's magic \\x93NUMPY) named .bin; "
                             f"read as raw tokens its header would become tokens. Rename it to .npy.")
        shard = _read_llmc_header(path, head, size)
        if shard is None:
            unknown = _unknown_llmc_header(path, head, size)
            if unknown is not None:
                raise unknown
            dtype = np.dtype(token_dtype)
            if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
                raise ValueError(f"token_dtype must be uint16 or uint32, got {dtype}")
            if size % dtype.itemsize:
                raise ShardError(
                    f"{path}: a raw token file of {dtype} must have a size that is a multiple of {dtype.itemsize} "
                    f"bytes, found {size} bytes. The file is truncated, or its tokens have another width "
                    f"(pass token_dtype=).")
            shard = Shard(path, "raw", dtype, 0, size // dtype.itemsize)
    return replace(shard, identity=FileIdentity.of(st))


def open_shard(path: str, token_dtype=np.uint16) -> Shard:
    """Validate one shard file and describe where its tokens are. `token_dtype` applies to raw .bin only."""
    fd, st = _open_file(path)
    try:
        return _describe(path, fd, st, token_dtype)
    finally:
        os.close(fd)


def _descriptor_budget() -> int:
    """Shards a stream may keep a descriptor for: an eighth of the soft RLIMIT_NOFILE (128 of the common 1024)."""
    import resource

    return resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 8


def _printable(path: str) -> str:
    """`path` for messages: a name that is not valid UTF-8 keeps its bytes as escapes."""
    return path.encode("utf-8", "backslashreplace").decode("utf-8")


def _check_non_negative(shard: Shard, tokens: np.ndarray) -> None:
    """int32 tokens are read as uint32: a negative id would become ~4.29e9 (one pass of min at open)."""
    if int(tokens.min()) < 0:
        first = int(np.argmax(tokens < 0))
        raise ShardError(f"{shard.path}: token ids must be non-negative, found {int(tokens[first])} at token {first} "
                         f"of this int32 .npy shard. Fix the tokens (ids are indexes into the vocabulary), or store "
                         f"them as uint16/uint32.")


class TokenStream:
    """The shards concatenated in order, memory-mapped, addressed by a global token position.

    Each shard is opened once, here: its identity (device, inode, size, mtime) recorded, its header checked,
    its file mapped. Every later read goes through those maps (or, without the native extension, through the
    descriptors opened here), never by opening a name again: a shard replaced by rename or deleted keeps its
    original content for the life of the stream, and a shard changed in place (truncated, grown, rewritten) is
    reported as ShardChanged (README, "Faults"). With the native extension no descriptor stays open.
    """

    def __init__(self, files, token_dtype=np.uint16):
        self.paths = resolve_paths(files)
        self.shards: list[Shard] = []
        self.arrays: list[np.ndarray] = []
        self._maps: list[FileMap] = []
        # Descriptors stay open for the pure-Python reads (pread), and for the checks when there are few shards
        # (fstat follows the opened file exactly; by name, a file renamed over an edited shard hides the edit).
        keep_files = not native.available() or len(self.paths) <= _descriptor_budget()
        self._files: list[int] = []
        try:
            for path in self.paths:
                self._open(path, token_dtype, keep_files)
        except BaseException:
            self.close()
            raise
        widths: dict[np.dtype, list[Shard]] = {}
        for shard in self.shards:
            widths.setdefault(shard.dtype, []).append(shard)
        if len(widths) > 1:
            self.close()
            found = "; ".join(f"{len(group)} of {dtype} (first: {group[0].path})" for dtype, group in widths.items())
            raw = any(s.format == "raw" for s in self.shards)
            raise ShardError(
                f"shards mix token widths: {found}. Expected one width for the whole stream: re-create the shards "
                f"with one tokenizer/format" + (", or pass token_dtype=np.uint32 for raw uint32 .bin files." if raw else "."))
        self.dtype = self.shards[0].dtype
        counts = np.array([s.num_tokens for s in self.shards], dtype=np.int64)
        # starts[i] = global position of shard i's first token; starts[-1] = total tokens.
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.num_tokens = int(self.starts[-1])
        self.closed = False
        # The native reads (and the native backend's gathers, watched: csrc/watch.h) go through this table.
        self._abs_paths = [os.path.abspath(p) for p in self.paths]  # a chdir later changes nothing
        self.table = None
        if native.available():
            fds = self._files or [-1] * len(self.shards)
            self.table = native.module().ShardTable(
                self.arrays, [_printable(p) for p in self.paths], [os.fsencode(p) for p in self._abs_paths],
                [(i.device, i.inode, i.size, i.mtime_ns, fd) for i, fd in zip((s.identity for s in self.shards), fds)])

    def _open(self, path: str, token_dtype, keep_file: bool) -> None:
        fd, st = _open_file(path)
        try:
            shard = _describe(path, fd, st, token_dtype)
            file_map = FileMap(fd, st.st_size, path)
        except BaseException:
            os.close(fd)
            raise
        if keep_file:
            self._files.append(fd)
        else:
            os.close(fd)  # the map needs no descriptor
        tokens = np.asarray(file_map)[shard.offset:shard.offset + shard.num_tokens * shard.dtype.itemsize]
        tokens = tokens.view(shard.dtype)
        self.shards.append(shard)
        self._maps.append(file_map)
        self.arrays.append(tokens)
        if shard.signed:
            _check_non_negative(shard, tokens.view(np.int32))

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
        """Tokens [start, start+len(out)) into `out` (1-D, stream dtype), then a check that no shard they came from
        changed since the stream opened it (ShardChanged otherwise): what lands in `out` is the original content.

        Native: a copy from the maps and the check, GIL released, a truncated shard's lost pages raising ShardFault
        instead of the SIGBUS that would kill the process. Pure Python: pread on the descriptors opened at
        construction, then one os.stat per shard read.
        """
        if not isinstance(out, np.ndarray) or out.ndim != 1 or out.dtype != self.dtype:
            found = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
            raise ValueError(f"read_into: expected a 1-D {self.dtype} array, found {found}")
        if not (out.flags.c_contiguous and out.flags.writeable):
            raise ValueError("read_into: `out` must be C-contiguous and writeable; pass np.empty(n, dtype=stream.dtype)")
        if self.closed:
            raise RuntimeError("read_into: the token stream is closed")
        if self.table is not None:  # the copy, then the check of the shards it read, in C++
            if start < 0 or start > self.num_tokens or out.size > self.num_tokens - start:
                raise IndexError(f"tokens [{start}, {start + out.size}) outside the stream of {self.num_tokens}")
            self.table.read(start, out.ctypes.data, out.size)
            return
        view = memoryview(out).cast("B")
        pieces = list(self._pieces(start, out.size))
        for shard, local, take, done in pieces:
            self._pread(shard, view, local, take, done)
        for shard, _, _, _ in pieces:
            self.check_unchanged(shard)

    def _pread(self, shard: int, view: memoryview, local: int, take: int, done: int) -> None:
        info, itemsize = self.shards[shard], self.dtype.itemsize
        fd = self._files[shard]
        first, want, got = info.offset + local * itemsize, take * itemsize, 0
        while got < want:  # os.preadv fills `out` in place and releases the GIL; a read may come back short
            try:
                n = os.preadv(fd, [view[done * itemsize + got:(done + take) * itemsize]], first + got)
            except OSError as e:
                raise type(e)(e.errno, f"{info.path}: read failed at byte offset {first + got}: expected {want} "
                                       f"bytes from offset {first}, got {got} ({e.strerror}). Check the disk "
                                       f"(dmesg) and restore the shard, then restart from the last checkpoint.") from e
            if n == 0:
                size = os.fstat(fd).st_size
                raise ShardChanged(
                    f"{info.path}: unexpected end of file at byte offset {first + got}: expected {want} bytes "
                    f"from offset {first}, got {got}; the file now holds {size} bytes, the stream expects "
                    f"{info.offset + info.num_tokens * itemsize}. The shard was truncated or changed while "
                    f"training: restore it (or re-create it with the same content) and restart from the last "
                    f"checkpoint.")
            got += n

    def check_unchanged(self, shard: int) -> None:
        """Raise ShardChanged if shard `shard`'s file changed since the stream opened it (one stat)."""
        info = self.shards[shard]
        change = info.identity.change(self._abs_paths[shard], self._files[shard] if self._files else None)
        if change:
            raise ShardChanged(f"{info.path}: {change} after the loader opened it; gpuload reads a shard as it was "
                               f"when the loader opened it, and this one no longer is.")

    def advise(self, start: int, count: int) -> None:
        """Tell the kernel that tokens [start, start+count) will be read soon (readahead); a hint, never fails."""
        if self.closed:
            return
        itemsize = self.dtype.itemsize
        for shard, local, take, _ in self._pieces(start, count):
            self._maps[shard].advise_willneed(self.shards[shard].offset + local * itemsize, take * itemsize)

    def check_int32_inputs(self) -> None:
        """input_dtype=torch.int32: refuse ids >= 2**31, which x would wrap to negative values and y would not.

        Free for uint16 tokens and int32 .npy (checked non-negative at open) and when a prepare manifest gives a
        vocabulary below 2**31; otherwise one pass of max over the shards."""
        if self.dtype == np.uint16 or all(s.signed for s in self.shards):
            return
        vocabulary = self.vocabulary()
        if vocabulary is not None and vocabulary[1] <= 2**31:
            return
        for shard, tokens in zip(self.shards, self.arrays):
            if not shard.signed and int(tokens.max()) >= 2**31:
                first = int(np.argmax(tokens >= 2**31))
                raise ValueError(f"{shard.path}: token {first} is {int(tokens[first])}, which input_dtype=torch.int32 "
                                 f"cannot hold (x would wrap to a negative id while y keeps it). Pass "
                                 f"input_dtype=torch.int64, or fix the shard: ids index a vocabulary below 2**31.")

    def close(self) -> None:
        """Close the descriptors kept for pure-Python reads and stop the native table's watch (the maps go when
        the last array viewing them is dropped)."""
        self.closed = True
        self.table = None
        files, self._files = self._files, []
        for fd in files:
            os.close(fd)

    def vocabulary(self) -> Optional[tuple[str, int, str]]:
        """(encoding name, vocabulary size, manifest path) from the `gpuload prepare` manifest beside the shards.

        None when no shard directory holds a manifest (shards from elsewhere carry no vocabulary); a
        malformed manifest is skipped with a warning (load_manifest), as if it were absent.
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
            # The name's bytes as the OS has them (a name that is not UTF-8 still hashes; UTF-8 names as before).
            h.update(os.fsencode(os.path.basename(shard.path)) + f":{shard.num_tokens};".encode())
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

