"""`gpuload inspect`: what token shards hold (format, width, counts, token range, delimiters, first tokens)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from gpuload.encodings import EncodingError, delimiter_token, get_encoding
from gpuload.prepare import KINDS
from gpuload.shards import (LLMC_FORMATS, LLMC_MAGIC_FOR_DTYPE, MANIFEST, SHARD_SUFFIXES, Shard, ShardError,
                             load_manifest, open_shard, resolve_paths)
CHUNK = 1 << 24  # tokens per pass: bounds the temporary arrays of min/max/count to a few tens of MB


def shard_stats(shard: Shard, delimiter: Optional[int]) -> dict:
    """Min, max and delimiter count of one shard, read in chunks."""
    tokens = shard.memmap()
    low, high, count = None, None, 0
    for start in range(0, shard.num_tokens, CHUNK):
        chunk = tokens[start:start + CHUNK]
        low = int(chunk.min()) if low is None else min(low, int(chunk.min()))
        high = int(chunk.max()) if high is None else max(high, int(chunk.max()))
        if delimiter is not None:
            count += int(np.count_nonzero(chunk == delimiter))
    return {"min": low, "max": high, "delimiters": count if delimiter is not None else None}


def describe_format(shard: Shard) -> str:
    """e.g. 'llmc v1' (the llm.c header version), 'raw' or 'npy'."""
    if shard.format == "llmc":
        return f"llmc v{LLMC_FORMATS[LLMC_MAGIC_FOR_DTYPE[shard.dtype]][0]}"
    return shard.format


def _encoding(spec: Optional[str], where: str) -> tuple:
    """(encoding or None, a note saying why there is none)."""
    if spec is None:
        return None, "no encoding known: pass --encoding NAME to decode tokens and count delimiters"
    try:
        return get_encoding(spec), None
    except EncodingError as e:
        return None, f"encoding {spec!r} ({where}) unavailable, tokens not decoded: {str(e)[:300]}"


def decode_preview(enc, tokens: Sequence[int]) -> tuple:
    """(text or None, note): the first tokens as text, or why they cannot be shown."""
    if enc is None:
        return None, None
    outside = [t for t in tokens if t >= enc.n_vocab]
    if outside:
        return None, (f"token {outside[0]} is outside encoding {enc.name!r} (vocabulary {enc.n_vocab}): "
                      f"the shards were made with another encoding")
    try:
        return enc.decode(list(tokens), errors="replace"), None
    except (KeyError, ValueError) as e:  # a rank the ranks file skips
        return None, f"cannot decode with encoding {enc.name!r} ({type(e).__name__}: {e}): wrong encoding?"


def _manifest_notes(entry: Optional[dict], row: dict, manifest: dict, counted_manifest_delimiter: bool) -> list:
    """Where one shard disagrees with its manifest entry: each means shards and manifest are from different runs."""
    name = os.path.basename(row["file"])
    if entry is None:
        return [f"{name} is not listed in {MANIFEST}"]
    fix = "the manifest belongs to another run, or the shard was changed; re-run gpuload prepare"
    notes = []
    if entry.get("tokens") != row["tokens"]:
        notes.append(f"{name}: {MANIFEST} says {entry.get('tokens')} tokens, the file holds {row['tokens']}: {fix}")
    if manifest.get("token_dtype") not in (None, row["dtype"]):
        notes.append(f"{name}: {MANIFEST} says {manifest['token_dtype']} tokens, the file holds {row['dtype']}: {fix}")
    # Documents are counted by delimiter when writing; a --encoding other than the manifest's counts another token.
    if counted_manifest_delimiter and "documents" in entry and entry["documents"] != row["delimiters"]:
        notes.append(f"{name}: {MANIFEST} says {entry['documents']} documents, the file holds {row['delimiters']} "
                     f"delimiters: {fix}")
    return notes


def _missing_notes(manifest: dict, files: list) -> list:
    """Manifest shards absent from disk, and a token total that does not add up."""
    directory = os.path.dirname(os.path.abspath(files[0]))
    entries = [s for s in manifest.get("shards", []) if isinstance(s, dict) and "file" in s]
    missing = [s["file"] for s in entries if not os.path.isfile(os.path.join(directory, s["file"]))]
    notes = []
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        notes.append(f"{len(missing)} shard(s) listed in {MANIFEST} are missing ({shown}): copy them back or "
                     f"re-run gpuload prepare")
    listed_total = sum(s.get("tokens") or 0 for s in entries)
    if isinstance(manifest.get("tokens"), int) and manifest["tokens"] != listed_total:
        notes.append(f"{MANIFEST} says {manifest['tokens']} tokens in all, its shards list {listed_total}: "
                     f"the manifest was edited or damaged; re-run gpuload prepare")
    return notes


def inspect_path(path: str, encoding: Optional[str] = None, num_tokens: int = 16) -> dict:
    """Report on one PATH: a shard file, a directory of shards, or a glob."""
    is_file = os.path.isfile(path)
    if is_file and not path.endswith(SHARD_SUFFIXES):
        hint = " Tokenize it first with gpuload prepare." if path.lower().endswith(tuple(KINDS)) else ""
        raise ShardError(f"{path}: expected a token shard (a file ending in .bin or .npy).{hint}")
    try:
        files = resolve_paths(path, mixed_splits_ok=True)
    except ShardError:
        raise
    except ValueError as e:  # shards' own checks on the path; made a ShardError so the CLI shows one line
        raise ShardError(str(e)) from None
    directories = {os.path.dirname(os.path.abspath(f)) for f in files}
    manifest, manifest_note = None, None
    if len(directories) == 1:
        try:
            manifest = load_manifest(directories.pop(), strict=True)
        except ShardError as e:  # the shards are still worth listing: their tokens do not depend on it
            manifest_note = f"{e} Its encoding, delimiter and counts are not used."
    listed = {s["file"]: s for s in manifest.get("shards", [])} if manifest else {}
    if manifest is not None and not any(os.path.basename(f) in listed for f in files):
        manifest, listed = None, {}  # a manifest of other files: its delimiter and encoding would mislead

    spec = encoding or (manifest.get("encoding") if manifest else None)
    enc, note = _encoding(spec, "--encoding" if encoding else MANIFEST)
    delimiter, placement, delimiter_from = None, None, None
    if manifest and isinstance(manifest.get("delimiter"), dict):
        delimiter, placement = manifest["delimiter"].get("token"), manifest["delimiter"].get("placement")
        delimiter_from = MANIFEST
    if encoding and enc is not None:
        delimiter, delimiter_from = delimiter_token(enc), "--encoding"

    shards, notes = [], [n for n in (manifest_note, note) if n]
    opened = [open_shard(file) for file in files]
    for file, shard in zip(files, opened):
        row = {"file": file, "format": describe_format(shard), "dtype": shard.dtype.name, "tokens": shard.num_tokens,
               **shard_stats(shard, delimiter)}
        shards.append(row)
        if manifest:
            notes += _manifest_notes(listed.get(os.path.basename(file)), row, manifest,
                                     delimiter_from == MANIFEST)
    if manifest:
        notes += _missing_notes(manifest, files)

    first = shards[0]
    head = [int(t) for t in opened[0].memmap()[:num_tokens]]
    text, decode_note = decode_preview(enc, head)
    if decode_note:
        notes.append(decode_note)
    return {
        "path": path,
        "single": is_file,
        "manifest": manifest is not None,
        "encoding": spec if enc is not None else None,
        "vocab_size": enc.n_vocab if enc is not None else None,
        "delimiter": delimiter,
        "placement": placement,
        "delimiter_from": delimiter_from,
        "shards": shards,
        "totals": {
            "shards": len(shards),
            "tokens": sum(s["tokens"] for s in shards),
            "min": min(s["min"] for s in shards),
            "max": max(s["max"] for s in shards),
            "delimiters": sum(s["delimiters"] for s in shards) if delimiter is not None else None,
        },
        "first": {"file": first["file"], "tokens": head, "text": text},
        "notes": notes,
    }


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def _delimiter_line(report: dict) -> str:
    if report["delimiter"] is None:
        return "unknown (no usable manifest.json; pass --encoding NAME)"
    placement = {"eos": " after each document", "bos": " before each document"}.get(report["placement"], "")
    return f"token {report['delimiter']}{placement} (from {report['delimiter_from']})"


def format_report(report: dict) -> str:
    """Readable text: details for one file, one line per shard plus totals for several."""
    lines = []
    totals = report["totals"]
    first = report["first"]
    preview = [f"  first {len(first['tokens'])} tokens: {first['tokens']}"]
    if first["text"] is not None:
        shown = first["text"] if len(first["text"]) <= 200 else first["text"][:200] + "..."
        preview.append(f"  decoded: {shown!r}")
    encoding = f"{report['encoding']} (vocabulary {report['vocab_size']:,})" if report["encoding"] else "unknown"
    if report["single"]:
        shard = report["shards"][0]
        lines += [
            shard["file"],
            f"  format      {shard['format']}, {shard['dtype']} tokens",
            f"  tokens      {shard['tokens']:,}",
            f"  min / max   {shard['min']:,} / {shard['max']:,}",
            f"  delimiter   {_delimiter_line(report)}: {_count(shard['delimiters'])} in this shard",
            f"  encoding    {encoding}",
        ]
    else:
        width = max(len(os.path.basename(s["file"])) for s in report["shards"])
        lines.append(f"{report['path']}: {totals['shards']} shards, encoding {encoding}, "
                     f"delimiter {_delimiter_line(report)}")
        lines.append(f"  {'shard':<{width}}  {'format':<8} {'dtype':<6} {'tokens':>15} {'min':>8} {'max':>8} "
                     f"{'delimiters':>12}")
        for s in report["shards"]:
            lines.append(f"  {os.path.basename(s['file']):<{width}}  {s['format']:<8} {s['dtype']:<6} "
                         f"{s['tokens']:>15,} {s['min']:>8,} {s['max']:>8,} {_count(s['delimiters']):>12}")
        lines.append(f"  {'total':<{width}}  {'':<8} {'':<6} {totals['tokens']:>15,} {totals['min']:>8,} "
                     f"{totals['max']:>8,} {_count(totals['delimiters']):>12}")
        preview[0] = f"  first {len(first['tokens'])} tokens of {os.path.basename(first['file'])}: {first['tokens']}"
    lines += preview
    lines += [f"  note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def inspect(paths: Sequence[str], encoding: Optional[str] = None, num_tokens: int = 16) -> list[dict]:
    """One report per PATH."""
    return [inspect_path(os.fspath(p), encoding, num_tokens) for p in paths]
