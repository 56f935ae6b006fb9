"""`gpuload prepare`: text, JSONL and Parquet documents -> llm.c token shards plus manifest.json."""

from __future__ import annotations

import ctypes
import glob
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import warnings
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field as dataclass_field
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from gpuload.encodings import (canonical_spec, delimiter_token, file_sha256, get_encoding, is_path_spec,
                               token_dtype)
from gpuload.machine import usable_cores
from gpuload.progress import Progress
from gpuload.shards import HEADER_BYTES, MANIFEST, SHARD_SUFFIXES, _is_pattern, llmc_header, natural_key

KINDS = {".txt": "text", ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}
COMPRESSED = (".gz", ".zst", ".zstd", ".bz2", ".xz", ".lz4", ".zip")
DEFAULT_SHARD_TOKENS = 100_000_000
MAX_SHARD_TOKENS = 2**31 - 1  # the llm.c header stores the count as int32
# Text per task. On 32 MB of JSONL with 2 workers: 64 KiB 34-38 MB/s, 256 KiB 44, 1 MiB 45.5,
# 4 MiB 41 (fewer tasks than it takes to keep both workers busy at the end); in flight at most
# 2 * workers + 2 tasks, so memory stays a few MB per worker.
BATCH_BYTES = 1 << 20
# A .txt file without --doc-sep is one document, read and encoded whole by one worker; its text, the
# decoded str and the token arrays take several times its size (review of issue 5: a few 102 MB files
# in flight peaked at 1 GB RSS), so such files are bounded (--max-doc-bytes) and the input bytes in
# flight are capped per worker too.
MAX_DOC_BYTES = 256 << 20
IN_FLIGHT_BYTES_PER_WORKER = 64 << 20
UTF8_BOM = b"\xef\xbb\xbf"
SHARD_NAME = re.compile(r"^(train|val)_\d{6,}\.bin$")
STAGING_PREFIX = ".gpuload-staging-"
OWNER = "owner.json"
MAX_SKIP_EXAMPLES = 20
SKIP_HINT = "pass --skip-bad to skip bad records and count them"

PathLike = Union[str, os.PathLike]


class PrepareError(ValueError):
    """Bad input or output directory; the message names the file, what was expected and what to do."""


@dataclass
class Source:
    """One input file: its kind and, for Parquet, the rows in each row group."""

    index: int
    path: str
    kind: str  # "text" | "jsonl" | "parquet"
    size: int  # 0 for a pipe, whose size is unknown
    row_groups: Sequence[int] = ()


@dataclass
class Encoded:
    """What one task produced: the tokens of its documents with delimiters, and what it counted or skipped."""

    source: int
    tokens: np.ndarray
    documents: int
    text_bytes: int
    empty: int
    skipped: list = dataclass_field(default_factory=list)  # [(where, reason)]


# ---------------------------------------------------------------------------------------------
# Inputs


def _kind(path: str) -> Optional[str]:
    return KINDS.get(os.path.splitext(path)[1].lower())


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        # Hidden files too: macOS writes "._data.jsonl" resource forks next to the data on foreign disks.
        found += [os.path.join(root, f) for f in files if not f.startswith(".") and _kind(f)]
    return sorted(found, key=natural_key)


def find_inputs(inputs: Iterable[PathLike]) -> list[str]:
    """Expand files, directories (recursively) and globs into input files, in order."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise PrepareError("no inputs given: pass .txt, .jsonl or .parquet files, directories or globs")
    wanted = ", ".join(KINDS)
    paths: list[str] = []
    for item in items:
        text = os.fspath(item)
        if _is_pattern(text) and not os.path.exists(text):  # "data[1].txt" may be a real name
            found = []
            for match in sorted(glob.glob(text, recursive=True), key=natural_key):
                found += _walk(match) if os.path.isdir(match) else ([match] if _kind(match) else [])
            if not found:
                raise PrepareError(f"no input files match {text!r}: expected files ending in {wanted}.")
            paths += found
        elif os.path.isdir(text):
            found = _walk(text)
            if not found:
                raise PrepareError(f"directory {text} holds no input files: expected files ending in {wanted}.")
            paths += found
        elif os.path.exists(text):
            if not _kind(text):
                if text.lower().endswith(COMPRESSED):
                    raise PrepareError(f"{text}: compressed inputs are not read; expected a file ending in "
                                       f"{wanted}. Decompress it first (e.g. `zstd -d`, `gunzip -k`).")
                raise PrepareError(f"{text}: unknown input kind; expected a file ending in {wanted}.")
            paths.append(text)
        else:
            raise PrepareError(f"{text}: no such file or directory. Check the path.")
    return paths


def _text_type(arrow_type) -> bool:
    import pyarrow as pa
    checks = [pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary]
    checks += [getattr(pa.types, "is_string_view", lambda t: False)]
    return any(check(arrow_type) for check in checks)


def _one_line(e: Exception, limit: int = 200) -> str:
    """pyarrow messages span several lines (schema dumps); a skip reason or an error is one line."""
    return " ".join(str(e).split())[:limit]


def describe_sources(paths: Sequence[str], field: str, skips: "Skips", sep: Optional[bytes] = None,
                     max_doc_bytes: int = MAX_DOC_BYTES) -> list[Source]:
    """Check every input can be opened (and Parquet has the column) before any work starts."""
    sources = []
    for path in paths:
        kind = _kind(path)
        try:
            if os.path.isfile(path):  # opening a named pipe here would take the data meant for the run
                with open(path, "rb"):
                    pass
            size = os.path.getsize(path)
        except OSError as e:
            skips.bad(path, f"cannot open the file ({e.strerror}); expected a readable file. Check its permissions")
            continue
        if kind == "text" and sep is None and size > max_doc_bytes:
            raise PrepareError(
                f"{path}: {size:,} bytes as one document (no --doc-sep); expected at most {max_doc_bytes:,} "
                f"(--max-doc-bytes), since a worker holds a whole document and its tokens in memory, several "
                f"times its size. Pass --doc-sep SEP to split it into documents, or raise --max-doc-bytes.")
        row_groups: list[int] = []
        if kind == "parquet":
            import pyarrow.parquet as pq
            try:
                with pq.ParquetFile(path) as pf:  # the footer only: schema and row-group sizes
                    schema = pf.schema_arrow
                    row_groups = [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)]
            except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
                skips.bad(path, f"not a readable Parquet file ({_one_line(e)})")
                continue
            if field not in schema.names:
                skips.bad(path, f"no column {field!r}; expected the text in it, found columns "
                                f"{', '.join(schema.names[:20])}. Pass --field NAME")
                continue
            if not _text_type(schema.field(field).type):
                skips.bad(path, f"column {field!r} holds {schema.field(field).type}; expected strings. "
                                f"Pass --field NAME")
                continue
        sources.append(Source(len(sources), path, kind, size, row_groups))
    return sources


# ---------------------------------------------------------------------------------------------
# Tasks: the main process cuts inputs into ordered batches; workers decode, parse and encode them.


def _read_error(path: str, e: OSError) -> PrepareError:
    return PrepareError(f"{path}: reading failed ({e.strerror or e}); expected a readable file. "
                        f"Check the file or disk.")


def _text_tasks(src: Source, sep: Optional[bytes], batch_bytes: int) -> Iterator[tuple]:
    if sep is None:  # one document: the worker reads the whole file
        yield ("text", src.index, src.path, None, 1, None), src.size
        return
    line = 1
    # Separators are matched left to right without overlap, as bytes.split does, so a batch always
    # ends where a split of the whole file would cut, whatever the read sizes ("\n\n\n" with "\n\n").
    pos = 0  # no separator starts in buf[:pos] that has not been found
    cut = -1  # start of the last separator found
    # Only a separator that can overlap itself ("\n\n", not "\n" or "<|endoftext|>") needs the scan one
    # match at a time; otherwise the last match is found in one rfind (a line per document stays cheap).
    overlaps = any(sep[:k] == sep[-k:] for k in range(1, len(sep)))
    with open(src.path, "rb") as f:
        head = f.read(len(UTF8_BOM))  # read(n) waits for n bytes or the end, on a pipe too
        bom = len(head) if head == UTF8_BOM else 0  # editors on Windows start UTF-8 files with one
        buf = bytearray(head[bom:])
        while True:
            block = f.read1(batch_bytes)  # read1: a pipe gives what it has instead of blocking for more
            if not block:
                if buf:
                    yield ("text", src.index, src.path, bytes(buf), line, sep), len(buf) + bom
                return
            buf += block
            if len(buf) < batch_bytes:
                continue
            while True:
                found = buf.find(sep, pos) if overlaps else buf.rfind(sep, pos)
                if found < 0:
                    break
                cut, pos = found, found + len(sep)
            pos = max(pos, len(buf) - len(sep) + 1)  # a document longer than a batch is scanned once, not per read
            if cut < 0:
                continue
            blob = bytes(buf[:cut])
            del buf[:cut + len(sep)]
            pos -= cut + len(sep)
            cut = -1
            yield ("text", src.index, src.path, blob, line, sep), len(blob) + len(sep) + bom
            bom = 0
            line += blob.count(b"\n") + sep.count(b"\n")


def _jsonl_tasks(src: Source, field: str, batch_bytes: int) -> Iterator[tuple]:
    line = 1
    with open(src.path, "rb") as f:
        while True:
            blob = f.read(batch_bytes)
            if not blob:
                return
            if not blob.endswith(b"\n"):
                blob += f.readline()  # whole lines only
            advance = len(blob)
            if line == 1 and blob.startswith(UTF8_BOM):  # a BOM is not JSON; editors on Windows write one
                blob = blob[len(UTF8_BOM):]
            yield ("jsonl", src.index, src.path, blob, line, field), advance
            line += blob.count(b"\n")


def _parquet_tasks(src: Source, field: str) -> Iterator[tuple]:
    total = max(sum(src.row_groups), 1)
    for group, rows in enumerate(src.row_groups):
        yield ("parquet", src.index, src.path, group, field), src.size * rows / total


def make_tasks(sources: Sequence[Source], field: str, sep: Optional[bytes], batch_bytes: int,
               skips: "Skips") -> Iterator[tuple]:
    """Yield (task, input bytes it covers) in input order."""
    for src in sources:
        try:
            if src.kind == "text":
                yield from _text_tasks(src, sep, batch_bytes)
            elif src.kind == "jsonl":
                yield from _jsonl_tasks(src, field, batch_bytes)
            else:
                yield from _parquet_tasks(src, field)
        except OSError as e:
            if not skips.skip_bad:
                raise _read_error(src.path, e) from None
            skips.add(src.path, f"reading failed ({e.strerror or e}); the rest of the file was skipped")


class Skips:
    """Bad records: raise at the first one, or with skip_bad count them and keep a few examples."""

    def __init__(self, skip_bad: bool):
        self.skip_bad = skip_bad
        self.count = 0
        self.examples: list[dict] = []

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append({"where": where, "reason": reason})

    def bad(self, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise PrepareError(f"{where}: {reason}. Fix the input, or {SKIP_HINT}.")
        self.add(where, reason)


def _json_type(value) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", list: "an array",
             dict: "an object"}
    return names.get(type(value), type(value).__name__)


class Encoder:
    """Turns tasks into token arrays; one lives in each worker process (or in the main one)."""

    def __init__(self, spec: str, bos: bool, strip: bool, skip_bad: bool):
        self.enc = get_encoding(spec)
        self.delimiter = delimiter_token(self.enc)
        self.dtype = token_dtype(self.enc)
        self.bos = bos
        self.strip = strip
        self.skip_bad = skip_bad
        self.parquet_cache: dict = {}
        # encode_to_numpy (tiktoken >= 0.8) skips building a Python list: 24 vs 20 MB/s per core.
        self.to_numpy = hasattr(self.enc, "encode_to_numpy")

    def encode(self, text: str) -> np.ndarray:
        """Exactly `encode_ordinary(text)`: no special tokens allowed and none refused."""
        if self.to_numpy:
            try:
                return self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
            except UnicodeEncodeError:  # lone surrogates from JSON escapes; encode_ordinary repairs them
                pass
        return np.asarray(self.enc.encode_ordinary(text), dtype=np.uint32)

    def run(self, task: tuple) -> Encoded:
        kind, source, path = task[:3]
        skipped: list = []
        if kind == "text":
            docs = self._text_docs(path, *task[3:], skipped)
        elif kind == "jsonl":
            docs = self._jsonl_docs(path, *task[3:], skipped)
        else:
            docs = self._parquet_docs(path, *task[3:], skipped)
        return self._assemble(source, docs, skipped)

    def _bad(self, skipped: list, where: str, reason: str) -> None:
        if not self.skip_bad:
            raise PrepareError(f"{where}: {reason}. Fix the input, or {SKIP_HINT}.")
        skipped.append((where, reason))

    def _text_docs(self, path, blob, first_line, sep, skipped) -> list:
        if blob is None:
            try:
                with open(path, "rb") as f:
                    blob = f.read()
            except OSError as e:
                self._bad(skipped, path, f"cannot read the file ({e.strerror})")
                return []
            if blob.startswith(UTF8_BOM):
                blob = blob[len(UTF8_BOM):]
            pieces = [blob]
        else:
            pieces = blob.split(sep)
        docs = []
        offset = 0
        for piece in pieces:
            try:
                docs.append(piece.decode("utf-8"))
            except UnicodeDecodeError as e:
                line = first_line + blob.count(b"\n", 0, offset + e.start)
                self._bad(skipped, f"{path}, line {line}",
                          f"not valid UTF-8 (byte 0x{piece[e.start]:02x}); expected UTF-8 text"
                          + ("; the document was skipped" if self.skip_bad else ""))
            offset += len(piece) + (len(sep) if sep else 0)
        return docs

    def _jsonl_docs(self, path, blob, first_line, field, skipped) -> list:
        docs = []
        for number, raw in enumerate(blob.split(b"\n"), first_line):
            if not raw.strip():
                continue
            where = f"{path}, line {number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                self._bad(skipped, where, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            except ValueError as e:
                detail = f"{getattr(e, 'msg', e)} at column {getattr(e, 'colno', '?')}"
                self._bad(skipped, where, f"not valid JSON ({detail})")
                continue
            if not isinstance(record, dict):
                self._bad(skipped, where, f"expected a JSON object with a {field!r} field, found {_json_type(record)}")
                continue
            if field not in record:
                keys = ", ".join(list(record)[:10]) or "none"
                self._bad(skipped, where,
                          f"no field {field!r} (fields: {keys}); pass --field NAME if the text is elsewhere")
                continue
            value = record[field]
            if not isinstance(value, str):
                self._bad(skipped, where, f"field {field!r} is {_json_type(value)}; expected a string")
                continue
            docs.append(value)
        return docs

    def _parquet_docs(self, path, group, field, skipped) -> list:
        import pyarrow.parquet as pq
        where = f"{path}, row group {group}"
        try:
            pf = self.parquet_cache.get(path)
            if pf is None:
                self.parquet_cache.clear()  # keep one file open: tasks arrive in file order
                pf = self.parquet_cache[path] = pq.ParquetFile(path)
            # One thread: the workers are the parallelism; pyarrow's own pool would oversubscribe the cores.
            values = pf.read_row_group(group, columns=[field], use_threads=False).column(0).to_pylist()
        except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
            self._bad(skipped, where, f"cannot read it ({_one_line(e)})")
            return []
        docs = []
        for row, value in enumerate(values):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    self._bad(skipped, f"{where}, row {row}", f"not valid UTF-8 (byte 0x{value[e.start]:02x})")
                    continue
            if value is None:
                self._bad(skipped, f"{where}, row {row}", f"null in column {field!r}; expected a string")
                continue
            docs.append(value)
        return docs

    def _assemble(self, source: int, docs: list, skipped: list) -> Encoded:
        if self.strip:
            docs = [d.strip() for d in docs]
        kept = [d for d in docs if d]
        parts = [self.encode(d) for d in kept]
        out = np.empty(sum(len(p) for p in parts) + len(parts), dtype=self.dtype)
        pos = 0
        for part in parts:
            if self.bos:
                out[pos] = self.delimiter
                out[pos + 1:pos + 1 + len(part)] = part
            else:
                out[pos:pos + len(part)] = part
                out[pos + len(part)] = self.delimiter
            pos += len(part) + 1
        text_bytes = sum(_utf8_size(d) for d in kept)
        return Encoded(source, out, len(kept), text_bytes, len(docs) - len(kept), skipped)


def _utf8_size(text: str) -> int:
    """Bytes of `text` as tokenized: a lone surrogate (JSON "\\ud800") counts as the U+FFFD tiktoken puts there."""
    if text.isascii():  # O(1) in CPython: pure-ASCII documents skip re-encoding just to count bytes
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:  # the same repair as tiktoken's encode_ordinary
        return len(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8"))


_WORKER: Optional[Encoder] = None


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(1)


def _die_with_parent(parent: int) -> None:
    """End this worker when the main process dies, even by SIGKILL or the OOM killer.

    Forked workers wait for tasks on a pipe whose write end they inherited, so they never see EOF;
    left alone they would live on, holding the parent's stdout and stderr open (a caller waiting for
    the output would hang). Linux kills them when the parent thread that started them exits (the one
    that submitted the first tasks, alive until the pool is shut down); elsewhere a thread polls.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):  # no libc symbol to call: fall back to polling
            armed = False
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="gpuload-parent-watch").start()


def _init_worker(parent: int, spec: str, bos: bool, strip: bool, skip_bad: bool) -> None:
    global _WORKER
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a forked worker inherits the CLI's cleanup handler
    _WORKER = Encoder(spec, bos, strip, skip_bad)


def _run_task(task: tuple) -> Encoded:
    return _WORKER.run(task)


def start_method() -> str:
    """How worker processes start: GPULOAD_START_METHOD, else fork on Linux and spawn elsewhere.

    Spawned workers start a fresh interpreter and load the encoding again; forked ones start in
    milliseconds with the encoding already loaded, and run only tiktoken, numpy and pyarrow code,
    whose thread pools (OpenBLAS, jemalloc, Arrow) reset at fork. Everything a worker needs is also passed by a
    picklable spec, so spawn (the default on macOS and Windows) gives the same shards.
    """
    method = os.environ.get("GPULOAD_START_METHOD") or ("fork" if sys.platform.startswith("linux") else "spawn")
    if method not in multiprocessing.get_all_start_methods():
        raise PrepareError(f"GPULOAD_START_METHOD={method!r}: expected one of "
                           f"{', '.join(multiprocessing.get_all_start_methods())}. Unset it or fix the value.")
    return method


def encode_tasks(tasks: Iterator[tuple], encoder_args: tuple, workers: int,
                 max_bytes: Optional[int] = None) -> Iterator[tuple]:
    """Yield (Encoded, input bytes) in task order.

    In flight at most 2 * workers + 2 tasks, and at most `max_bytes` of input (default
    IN_FLIGHT_BYTES_PER_WORKER per worker) beyond the oldest task: whole-file documents are large.
    """
    if workers <= 1:
        encoder = Encoder(*encoder_args)
        for task, advance in tasks:
            yield encoder.run(task), advance
        return
    max_bytes = workers * IN_FLIGHT_BYTES_PER_WORKER if max_bytes is None else max_bytes
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start_method()),
                               initializer=_init_worker, initargs=(os.getpid(), *encoder_args))
    pending: deque = deque()
    in_flight = 0
    try:
        for task, advance in tasks:
            pending.append((pool.submit(_run_task, task), advance))
            in_flight += advance
            # Finished results go out at once too: a pipe that stalls mid-run still gets its shards written.
            while pending and (len(pending) >= 2 * workers + 2 or in_flight > max_bytes or pending[0][0].done()):
                future, done = pending.popleft()
                in_flight -= done
                yield future.result(), done
        while pending:
            future, done = pending.popleft()
            yield future.result(), done
    except BrokenProcessPool:
        raise PrepareError(
            "a worker process died before finishing its batch: killed, out of memory, or it could not start "
            "(spawned workers re-import the main script, so call prepare() under `if __name__ == '__main__':`). "
            "Retry with fewer --workers, or --workers 1.") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Output: shards streamed into a staging directory, moved into --out only when the run succeeds.


class ShardWriter:
    """Streams tokens into llm.c shards: the first `val_tokens` into val_NNNNNN.bin, the rest into train_NNNNNN.bin."""

    def __init__(self, directory: str, dtype: np.dtype, shard_tokens: int, val_tokens: int, delimiter: int):
        self.directory = directory
        self.token_dtype = np.dtype(dtype)
        self.dtype = self.token_dtype.newbyteorder("<")
        self.shard_tokens = shard_tokens
        self.val_left = val_tokens
        self.delimiter = delimiter
        self.split = "val" if val_tokens > 0 else "train"
        self.numbers = {"val": 0, "train": 0}
        self.records: list[dict] = []
        self.file = None
        self.name = ""
        self.count = 0
        self.documents = 0

    def _open(self) -> None:
        self.name = f"{self.split}_{self.numbers[self.split]:06d}.bin"
        self.numbers[self.split] += 1
        self.file = open(os.path.join(self.directory, self.name + ".tmp"), "wb")
        self.file.write(bytes(HEADER_BYTES))  # count 0 until the shard is complete: readers reject it
        self.count = 0
        self.documents = 0

    def _finish(self) -> None:
        self.file.seek(0)
        self.file.write(llmc_header(self.token_dtype, self.count))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        self.file = None
        os.replace(os.path.join(self.directory, self.name + ".tmp"), os.path.join(self.directory, self.name))
        self.records.append({"file": self.name, "split": self.split, "tokens": self.count,
                             "documents": self.documents})

    def write(self, tokens: np.ndarray) -> None:
        pos = 0
        while pos < len(tokens):
            if self.file is None:
                self._open()
            room = self.shard_tokens - self.count
            if self.split == "val":
                room = min(room, self.val_left)
            piece = tokens[pos:pos + room]
            self.file.write(memoryview(np.ascontiguousarray(piece, dtype=self.dtype)))
            self.count += len(piece)
            self.documents += int(np.count_nonzero(piece == self.delimiter))
            pos += len(piece)
            if self.split == "val":
                self.val_left -= len(piece)
            if self.count == self.shard_tokens or (self.split == "val" and self.val_left == 0):
                self._finish()
                if self.split == "val" and self.val_left == 0:
                    self.split = "train"

    def close(self) -> list[dict]:
        """Finish the open shard; return one record per shard written."""
        if self.file is not None and self.count:
            self._finish()
        return self.records

    def abort(self) -> None:
        """Close the open shard unfinished; its bytes are thrown away, so a flush that fails (disk full) is too."""
        file, self.file = self.file, None
        if file is not None:
            try:
                file.close()
            except OSError:  # the buffered bytes could not be written; the file goes with the staging directory
                pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        pass
    return True


def remove_stale_staging(out: str) -> list[str]:
    """Delete staging directories left by runs on this host that were killed (their process is gone)."""
    removed = []
    for name in os.listdir(out):
        if not name.startswith(STAGING_PREFIX):
            continue
        path = os.path.join(out, name)
        try:
            pid = int(name[len(STAGING_PREFIX):].split("-")[0])
        except ValueError:
            continue
        try:
            with open(os.path.join(path, OWNER)) as f:
                host = json.load(f).get("host")
        except (OSError, ValueError):
            host = socket.gethostname()  # killed before writing it, an instant after creating the directory
        if host == socket.gethostname() and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an --out whose shards would mix with the new ones."""
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise PrepareError(f"--out {out} is a file; expected a directory for the shards. Choose another path.")
    names = sorted(os.listdir(out), key=natural_key)
    foreign = [n for n in names if n.endswith(SHARD_SUFFIXES) and not SHARD_NAME.match(n)]
    if foreign:
        raise PrepareError(
            f"{out} holds token files that gpuload prepare did not write ({', '.join(foreign[:3])}); a loader "
            f"given this directory would read them together with the new shards. Remove them or choose another --out.")
    ours = [n for n in names if SHARD_NAME.match(n) or n == MANIFEST]
    if ours and not overwrite:
        shown = ", ".join(ours[:3]) + (", ..." if len(ours) > 3 else "")
        raise PrepareError(
            f"{out} already holds prepared shards ({shown}); expected an empty or new directory so old and new "
            f"shards do not mix. Pass --overwrite to replace them (the old ones are removed only after the new "
            f"run completes), or choose another --out.")


def _make_staging(out: str) -> str:
    os.makedirs(out, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out)
    try:
        with open(os.path.join(staging, OWNER), "w") as f:
            json.dump({"host": socket.gethostname(), "pid": os.getpid()}, f)
    except BaseException:  # a full disk can take the directory but not the file in it
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return staging


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not possible on every platform; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(out: str, name: str, e: OSError) -> PrepareError:
    return PrepareError(f"{out}: writing {name} failed ({e.strerror or e}); free space or choose another --out.")


def _commit(staging: str, out: str, records: list[dict], overwrite: bool) -> None:
    """Swap the finished shards into --out; the manifest goes last, so no manifest means incomplete."""
    check_out(out, overwrite)  # again: another run may have written here meanwhile
    # Once the old shards start to go, Ctrl-C or SIGTERM would leave --out with neither run's shards;
    # held off for these few renames, they take effect when the commit is done. Handlers that only
    # record the signal, rather than pthread_sigmask: a signal may land on any thread that does not
    # block it, and Python runs the handler in the main thread anyway. SIGKILL cannot be held off.
    held: list = []
    can_hold = threading.current_thread() is threading.main_thread()
    previous = {}
    if can_hold:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
    name = MANIFEST
    try:
        if os.path.exists(os.path.join(out, MANIFEST)):
            os.remove(os.path.join(out, MANIFEST))
        for name in os.listdir(out):
            if SHARD_NAME.match(name):
                os.remove(os.path.join(out, name))
        for record in records:
            name = record["file"]
            os.replace(os.path.join(staging, name), os.path.join(out, name))
        name = MANIFEST
        os.replace(os.path.join(staging, MANIFEST), os.path.join(out, MANIFEST))
        _fsync_dir(out)
    except OSError as e:
        raise _write_error(out, name, e) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        for sig in held[:1]:
            signal.raise_signal(sig)  # now handled as it would have been: KeyboardInterrupt, the CLI's exit


# ---------------------------------------------------------------------------------------------


def default_workers() -> int:
    return usable_cores()


def _estimated_tasks(sources: Sequence[Source], sep: Optional[bytes], batch_bytes: int) -> int:
    count = 0
    for src in sources:
        if src.kind == "parquet":
            count += len(src.row_groups)
        elif src.kind == "text" and sep is None:
            count += 1
        elif not src.size and not os.path.isfile(src.path):
            return sys.maxsize  # a pipe: its size is unknown, so do not cap the workers by it
        else:
            count += max(1, -(-src.size // batch_bytes))
    return count


def prepare(inputs, out: PathLike, *, encoding: str = "gpt2", field: str = "text", doc_sep: Optional[str] = None,
            strip: bool = False, bos: bool = False, shard_tokens: int = DEFAULT_SHARD_TOKENS, val_tokens: int = 0,
            workers: Optional[int] = None, overwrite: bool = False, skip_bad: bool = False, quiet: bool = True,
            batch_bytes: int = BATCH_BYTES, max_doc_bytes: int = MAX_DOC_BYTES) -> dict:
    """Tokenize documents into llm.c shards in `out`; return the manifest that was written."""
    from gpuload import __version__  # here, not at the top: gpuload/__init__ may come to import this module

    out = os.fspath(out)
    if not 1 <= shard_tokens <= MAX_SHARD_TOKENS:
        raise PrepareError(f"--shard-tokens must be between 1 and {MAX_SHARD_TOKENS} (the llm.c header holds an "
                           f"int32 count), got {shard_tokens}.")
    if val_tokens < 0:
        raise PrepareError(f"--val-tokens must be 0 or more, got {val_tokens}.")
    if doc_sep == "":
        raise PrepareError("--doc-sep must not be empty; omit it to make each .txt file one document.")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {workers}.")
    cores = usable_cores()
    if workers > cores:
        # Encoding is CPU-bound: extra processes only take turns on the cores, each with its own memory.
        warnings.warn(f"gpuload: --workers {workers} capped at the {cores} usable core{'s' * (cores != 1)}",
                      stacklevel=2)
        workers = cores
    if max_doc_bytes < 1:
        raise PrepareError(f"--max-doc-bytes must be at least 1, got {max_doc_bytes}.")

    spec = canonical_spec(encoding)
    enc = get_encoding(spec)  # here first, so a missing encoding fails before any work
    delimiter = delimiter_token(enc)
    dtype = token_dtype(enc)
    sep = doc_sep.encode("utf-8") if doc_sep is not None else None
    skips = Skips(skip_bad)

    check_out(out, overwrite)
    sources = describe_sources(find_inputs(inputs), field, skips, sep, max_doc_bytes)
    if not sources:
        raise PrepareError(f"no readable inputs (skipped {skips.count}: {skips.examples[0]['where']}: "
                           f"{skips.examples[0]['reason']}).")
    created = not os.path.exists(out)
    os.makedirs(out, exist_ok=True)
    remove_stale_staging(out)
    workers = min(workers, _estimated_tasks(sources, sep, batch_bytes))

    progress = Progress("prepare", total=sum(s.size for s in sources) or None, rate="tokens", quiet=quiet)
    per_source = [{"documents": 0, "tokens": 0} for _ in sources]
    totals = {"documents": 0, "tokens": 0, "text_bytes": 0, "empty": 0}
    staging = writer = results = None
    succeeded = False
    try:
        try:
            staging = _make_staging(out)
        except OSError as e:
            raise _write_error(out, "the staging directory", e) from None
        writer = ShardWriter(staging, dtype, shard_tokens, val_tokens, delimiter)
        results = encode_tasks(make_tasks(sources, field, sep, batch_bytes, skips), (spec, bos, strip, skip_bad),
                               workers)
        for encoded, advance in results:
            try:
                writer.write(encoded.tokens)
            except OSError as e:
                raise _write_error(out, writer.name, e) from None
            for where, reason in encoded.skipped:
                skips.add(where, reason)
            per_source[encoded.source]["documents"] += encoded.documents
            per_source[encoded.source]["tokens"] += len(encoded.tokens)
            totals["documents"] += encoded.documents
            totals["tokens"] += len(encoded.tokens)
            totals["text_bytes"] += encoded.text_bytes
            totals["empty"] += encoded.empty
            progress.update(nbytes=encoded.text_bytes, advance=advance, docs=encoded.documents,
                            tokens=len(encoded.tokens))
        try:
            records = writer.close()
        except OSError as e:
            raise _write_error(out, writer.name, e) from None
        if not records:
            raise PrepareError(f"the inputs hold no documents ({len(sources)} files, {totals['empty']} empty "
                               f"documents, {skips.count} skipped); expected some text to tokenize.")
        if not any(r["split"] == "train" for r in records):
            raise PrepareError(f"the inputs gave {totals['tokens']} tokens, all taken by --val-tokens {val_tokens}; "
                               f"expected some left for training. Lower --val-tokens.")
        progress.close()
        manifest = {
            "format": "llmc",
            "gpuload_version": __version__,
            "encoding": spec,
            "encoding_name": enc.name,
            "vocab_size": enc.n_vocab,
            "token_dtype": dtype.name,
            "delimiter": {"token": delimiter, "placement": "bos" if bos else "eos", "text": "<|endoftext|>"},
            "documents": totals["documents"],
            "tokens": totals["tokens"],
            "text_bytes": totals["text_bytes"],
            "empty_documents": totals["empty"],
            "shard_tokens": shard_tokens,
            "val_tokens": val_tokens,
            "field": field,
            "doc_sep": doc_sep,
            "strip": strip,
            "shards": records,
            "inputs": [{"path": os.path.abspath(s.path), "kind": s.kind, "bytes": s.size, **per_source[s.index]}
                       for s in sources],
            "skipped": {"count": skips.count, "examples": skips.examples},
        }
        if is_path_spec(spec):
            manifest["encoding_sha256"] = file_sha256(spec)
        try:
            with open(os.path.join(staging, MANIFEST), "w") as f:
                json.dump(manifest, f, indent=1)
                f.write("\n")
        except OSError as e:
            raise _write_error(out, MANIFEST, e) from None
        _commit(staging, out, records, overwrite)
        succeeded = True
        return manifest
    finally:
        # Every step runs even when one before it fails: a failed run leaves no staging directory behind.
        try:
            if results is not None:
                results.close()  # stops the worker pool before the staging directory goes
        finally:
            if writer is not None:
                writer.abort()
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            if not succeeded:
                progress.abandon()
                if created:
                    try:
                        os.rmdir(out)  # only if still empty: a failed run leaves no trace
                    except OSError:
                        pass
