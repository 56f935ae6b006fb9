"""Loader states: what `state_dict()` saves and the one place a saved state is read and checked."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

from gpuload.sampling import check_domain

if TYPE_CHECKING:
    from gpuload.plan import Plan

STATE_FORMAT = "gpuload.loader/2"
STATE_KEYS = ("format", "step", "seed", "sampling", "seq_len", "global_batch", "align_bos", "sources")
SOURCE_STATE_KEYS = ("name", "dataset", "num_tokens", "windows_per_chunk", "rows")
STATE_FORMAT_1 = "gpuload.loader/1"  # before mixtures: one dataset, its fields at the top level


def _state_from_format_1(state: dict) -> dict:
    """A format-1 state as the one-source state of format 2 (a malformed one stays malformed, for the checks)."""
    old_keys = ("num_tokens", "dataset", "windows_per_chunk")
    source = {"name": None, **{key: state[key] for key in old_keys if key in state},
              "rows": state.get("global_batch")}
    rest = {key: value for key, value in state.items() if key not in old_keys}
    return {**rest, "format": STATE_FORMAT, "sources": [source]}


def make_state(plan: "Plan", step: int, seed: int) -> dict:
    """Everything needed to continue the same batch stream from `step`; plain data (JSON-serializable)."""
    return {
        "format": STATE_FORMAT, "step": step, "seed": seed, "sampling": plan.sampling,
        "seq_len": plan.seq_len, "global_batch": plan.global_batch, "align_bos": plan.align_bos,
        "sources": [source.state() for source in plan.sources], "pack": _pack(plan),
    }


def _pack(plan: "Plan"):
    """How rows are packed: None, 'bestfit' or 'bestfit-remainder' (a state without the key is unpacked)."""
    if not plan.pack:
        return None
    return plan.pack + ("-remainder" if plan.pack_remainder else "")


def check_state(plan: "Plan", state: dict) -> tuple[int, int]:
    """(step, seed) of a saved `state` for a loader of `plan`; refuses a state of other datasets, seq_len, global
    batch or sampling mode, and warns when a mixture's weights changed."""
    if isinstance(state, dict) and state.get("format") == STATE_FORMAT_1:
        state = _state_from_format_1(state)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not a gpuload loader state (expected format {STATE_FORMAT!r}): {state!r:.200}")
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"gpuload loader state is missing {', '.join(missing)}; was it saved by state_dict()?")
    for key in ("step", "seed", "seq_len", "global_batch"):
        if type(state[key]) is not int:
            raise ValueError(f"gpuload loader state: {key} must be an integer, found {state[key]!r}")
    if not 0 <= state["seed"] < 1 << 64:
        raise ValueError(f"gpuload loader state: seed must be in [0, 2**64) (the batches hash its 64 bits), found "
                         f"{state['seed']}; was it saved by state_dict()?")
    saved_sources = state["sources"]
    if (not isinstance(saved_sources, list) or not saved_sources
            or any(not isinstance(s, dict) or set(s) != set(SOURCE_STATE_KEYS) for s in saved_sources)):
        raise ValueError(f"gpuload loader state: sources must be a list of {{{', '.join(SOURCE_STATE_KEYS)}}}, "
                         f"found {saved_sources!r:.200}")
    for i, saved in enumerate(saved_sources):
        for key in ("num_tokens", "windows_per_chunk", "rows"):
            if type(saved[key]) is not int:
                raise ValueError(f"gpuload loader state: sources[{i}][{key!r}] must be an integer, found "
                                 f"{saved[key]!r}")
        if saved["rows"] < 1:
            raise ValueError(f"gpuload loader state: sources[{i}]['rows'] must be >= 1, found {saved['rows']}")
    if sum(saved["rows"] for saved in saved_sources) != state["global_batch"]:
        raise ValueError(f"gpuload loader state: the sources' rows {[s['rows'] for s in saved_sources]} do not "
                         f"sum to the global batch {state['global_batch']}; was it saved by state_dict()?")
    checks = [
        ("seq_len", state["seq_len"], plan.seq_len, "construct the loader with the saved seq_len"),
        ("global_batch", state["global_batch"], plan.global_batch,
         "world_size * batch_size must equal the saved global batch (elastic resume keeps it)"),
        ("sampling", state["sampling"], plan.sampling, "construct the loader with the saved sampling mode"),
        ("align_bos (the bos_token rows are aligned to, None = not aligned)", state["align_bos"],
         plan.align_bos, "construct the loader with the saved align and bos_token"),
        ("sources", [s["name"] for s in saved_sources], [s.name for s in plan.sources],
         "construct the loader with the saved sources: the same names in the same order (None = not a mixture)"),
        ("pack", state.get("pack"), _pack(plan), "construct the loader with the saved pack= and pack_remainder="),
    ]
    for name, saved, current, advice in checks:
        if saved != current:
            raise ValueError(f"cannot load loader state: {name} differs (saved {saved!r}, this loader "
                             f"{current!r}): {advice}")
    reweighted = []
    for saved, source in zip(saved_sources, plan.sources):
        label = "" if source.name is None else f" of source {source.name!r}"
        if saved["dataset"] != source.fingerprint:
            raise ValueError(f"cannot load loader state: the dataset{label} differs: the state was saved on "
                             f"{saved['num_tokens']} tokens, {source.where()} holds {source.num_tokens}, or "
                             f"other shards; pass the same shards in the same order")
        # Sequential batches do not depend on the ring's chunks.
        if plan.rule != "sequential" and saved["windows_per_chunk"] != source.windows_per_chunk:
            raise ValueError(f"cannot load loader state: the ring chunking{label} differs (windows_per_chunk "
                             f"saved {saved['windows_per_chunk']}, this loader {source.windows_per_chunk}; 0 = "
                             f"whole stream): construct the loader with the saved ring_tokens: with a ring smaller "
                             f"than the stream, random and shuffle batches depend on its chunks")
        if saved["rows"] != source.rows:
            reweighted.append(f"{source.name!r} {saved['rows']} -> {source.rows}")
    check_domain(state["step"], plan.global_batch, plan.num_tokens)
    if reweighted:
        warnings.warn(f"gpuload: resuming a mixture with other weights (rows per global batch: "
                      f"{', '.join(reweighted)}); from step {state['step']} on, each source reads by the contract "
                      f"with its new rows, so sequential and shuffle sources jump to another position of their "
                      f"epoch, and random sources on a chunked ring to another chunk (README, 'Mixtures')", stacklevel=3)
    return state["step"], state["seed"]
