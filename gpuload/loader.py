"""GPULoader: the iterator a training loop holds; batches, DDP ranks, and exact resume."""

from __future__ import annotations

import operator
import os
from typing import Optional

import numpy as np
import torch

from gpuload import native
from gpuload.kernels.gather import gather_reference
from gpuload.ring import PLACEMENTS, Ring, plan_ring
from gpuload.sampling import MASK64, SAMPLING_IDS, SAMPLING_MODES, check_domain, window_starts_and_visits
from gpuload.shards import TokenStream

BACKENDS = ("auto", "torch", "native", "triton")
STATE_FORMAT = "gpuload.loader/1"
STATE_KEYS = ("format", "step", "seed", "sampling", "seq_len", "global_batch", "num_tokens", "dataset",
              "windows_per_chunk", "align_bos")


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _as_int(name: str, value) -> int:
    """An integer argument (int, numpy integer, ...); bool and float are refused rather than truncated."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def default_rank_world() -> tuple[int, int]:
    """(rank, world_size) from torch.distributed when initialized, else torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    if rank is not None and world is not None:
        return rank, world
    return 0, 1


def default_device() -> torch.device:
    """cuda:{LOCAL_RANK} when CUDA is available (else the current CUDA device), else cpu."""
    if torch.cuda.is_available():
        local_rank = _env_int("LOCAL_RANK")
        return torch.device("cuda", torch.cuda.current_device() if local_rank is None else local_rank)
    return torch.device("cpu")


class GPULoader:
    """Infinite iterator of (x, y) token batches of shape (batch_size, seq_len) for one DDP rank.

    Global row g = rank * batch_size + b of step s reads the window chosen by `sampling` from
    (seed, s, g) and the global batch G = world_size * batch_size (see gpuload/sampling.py), so the
    stream of global batches is the same for any world_size with the same G. The torch and triton
    backends read tokens from a ring (gpuload/ring.py) of `ring_tokens` tokens (None: the whole stream
    when it fits gpuload.ring.default_ring_bytes()); a ring smaller than the stream switches random and
    shuffle to the chunked rule, on every backend alike.
    """

    def __init__(self, files, batch_size: int, seq_len: int, sampling: str = "random", seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, device=None,
                 input_dtype: torch.dtype = torch.int64, backend: str = "auto", token_dtype=np.uint16,
                 ring_tokens: Optional[int] = None, placement: str = "device", static_buffers: bool = False,
                 loop: bool = True, bos_token: Optional[int] = None, doc_info: bool = False,
                 align: Optional[str] = None):
        batch_size, seq_len, seed = _as_int("batch_size", batch_size), _as_int("seq_len", seq_len), _as_int("seed", seed)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if sampling not in SAMPLING_MODES:
            raise ValueError(f"sampling must be one of {SAMPLING_MODES}, got {sampling!r}")
        if input_dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_dtype must be torch.int64 or torch.int32, got {input_dtype}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not loop and sampling != "sequential":
            raise ValueError(f"loop=False (one pass, for evaluation) needs sampling='sequential', got {sampling!r}")
        if bos_token is not None:
            bos_token = _as_int("bos_token", bos_token)
        if (doc_info or align) and bos_token is None:
            raise ValueError("doc_info=True and align='bos' need bos_token=ID: documents are delimited by that token")
        if align not in (None, "bos"):
            raise ValueError(f"align must be None or 'bos', got {align!r}")
        if align and sampling == "sequential":
            raise ValueError("align='bos' works with sampling='random' or 'shuffle'; sequential reads the stream in order")
        if placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
        if ring_tokens is not None:
            ring_tokens = _as_int("ring_tokens", ring_tokens)
            if ring_tokens < 1:
                raise ValueError(f"ring_tokens must be >= 1 (or None for the whole stream), got {ring_tokens}")
        default_rank, default_world = default_rank_world()
        rank = default_rank if rank is None else _as_int("rank", rank)
        world_size = default_world if world_size is None else _as_int("world_size", world_size)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")

        self.batch_size, self.seq_len, self.sampling, self.seed = batch_size, seq_len, sampling, seed
        self.rank, self.world_size = rank, world_size
        self.global_batch = world_size * batch_size
        self.input_dtype = input_dtype
        self.device = torch.device(device) if device is not None else default_device()
        self.placement, self.static_buffers, self.loop = placement, bool(static_buffers), bool(loop)
        self.bos_token, self.doc_info, self.align = bos_token, bool(doc_info), align
        self.step = 0
        self._ring: Optional[Ring] = None
        self._source = None

        self.stream = TokenStream(files, token_dtype=token_dtype)
        if self.stream.num_tokens < seq_len + 1:
            raise ValueError(
                f"the shards hold {self.stream.num_tokens} tokens in all ({', '.join(self.stream.paths[:4])}"
                f"{', ...' if len(self.stream.paths) > 4 else ''}); a window needs seq_len + 1 = {seq_len + 1}. "
                f"Use a smaller seq_len or more data.")
        self.num_tokens = self.stream.num_tokens
        check_domain(0, self.global_batch, self.num_tokens)
        self.fingerprint = self.stream.fingerprint()
        self.ring_layout = plan_ring(self.num_tokens, self.stream.dtype.itemsize, seq_len, self.global_batch, ring_tokens)
        self.chunking = self.ring_layout.chunking
        self._doc_starts = None
        if align:
            self._doc_starts = self._usable_document_starts()
        self.backend = self._choose_backend(backend)
        self._rows = torch.arange(rank * batch_size, (rank + 1) * batch_size, dtype=torch.int64)
        self._out = None
        if self.static_buffers:
            self._out = (torch.empty((batch_size, seq_len), dtype=input_dtype, device=self.device),
                         torch.empty((batch_size, seq_len), dtype=torch.int64, device=self.device))
        # The native backend reads the memory maps in place through its shard table (which keeps them alive
        # while a call is in flight); the page cache is its ring. The others read the ring.
        if self.backend == "native":
            self._source = native.module().ShardTable(self.stream.arrays, self.stream.paths)
            self._starts = np.empty(batch_size, dtype=np.int64)
        else:
            if self.backend == "triton":
                self._check_triton_device()
            self._ring = Ring(self.stream, self.ring_layout, sampling, seed, self.device, placement)
            self._source = self._ring

    def _choose_backend(self, backend: str) -> str:
        if backend == "auto":
            if self.device.type == "cuda":
                return "triton"
            return "native" if native.module() is not None else "torch"
        if backend == "native" and not native.available():
            why = "disabled by GPULOAD_NO_NATIVE=1" if native.disabled() else "not built"
            raise RuntimeError(f"backend='native' requested but the native extension is {why}; "
                               f"use backend='torch' or reinstall gpuload with a C++ compiler present")
        return backend

    def _usable_document_starts(self) -> torch.Tensor:
        """The positions of bos_token where a whole window fits (int64, CPU), found once at construction."""
        from gpuload.documents import document_starts, usable_document_starts

        if self.chunking is not None:
            raise ValueError(f"align='bos' needs the whole stream in the ring (ring_tokens >= {self.num_tokens}); "
                             f"aligned rows with a ring smaller than the stream are not implemented yet")
        try:
            return usable_document_starts(document_starts(self.stream.arrays, self.bos_token, device="cpu"),
                                          self.num_tokens, self.seq_len)
        except ValueError as e:
            raise ValueError(f"align='bos' in {self.stream.paths[0]}{' ...' if len(self.stream.paths) > 1 else ''}: "
                             f"{e}") from None

    def _check_triton_device(self) -> None:
        from gpuload.kernels import triton_gather  # imported late: triton is slow to import

        if self.device.type == "cpu" and not triton_gather.interpreter_active():
            raise RuntimeError("backend='triton' on the CPU needs TRITON_INTERPRET=1 set before triton is imported "
                               "(Triton's interpreter); use a CUDA device, or backend='native' on the CPU")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' runs on CUDA devices (or the CPU interpreter), not {self.device}")

    def __iter__(self):
        return self

    def __len__(self) -> int:
        """Batches in one pass with loop=False: whole global batches of the epoch (a final partial one is dropped)."""
        if self.loop:
            raise TypeError("a looping GPULoader is infinite; pass loop=False for one pass with a length")
        return (self.num_tokens - 1) // self.seq_len // self.global_batch

    def __next__(self):
        """(x, y), or (x, y, doc) with doc_info=True (gpuload.documents.DocInfo, computed on the batch's device)."""
        if not self.loop and self.step >= len(self):
            raise StopIteration
        x, y = self._produce(self.step)
        self.step += 1
        if self.doc_info:
            return x, y, self._doc_info(x)
        return x, y

    def _doc_info(self, x: torch.Tensor):
        if self.backend == "triton":
            from gpuload.kernels.triton_docs import doc_info_triton

            return doc_info_triton(x, self.bos_token)
        from gpuload.documents import doc_info_reference

        return doc_info_reference(x, self.bos_token)

    def window_starts(self, step: int) -> torch.Tensor:
        """Window start of each of this rank's rows at `step` (int64, on the CPU)."""
        if self._doc_starts is not None:
            from gpuload.documents import aligned_window_starts

            return aligned_window_starts(self.sampling, self.seed, step, self._rows, self.global_batch,
                                         self._doc_starts, self.num_tokens)
        return window_starts_and_visits(self.sampling, self.seed, step, self._rows, self.global_batch,
                                        self.num_tokens, self.seq_len, self.chunking)[0]

    def _produce(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self._source  # read once: close() may clear it from another thread meanwhile
        if source is None:
            raise RuntimeError("the loader is closed; create a new GPULoader (and load_state_dict) to go on")
        check_domain(step, self.global_batch, self.num_tokens)
        B, T = self.batch_size, self.seq_len
        out_x, out_y = self._out if self._out is not None else (None, None)
        if self.backend == "native":
            # Pinned host memory lets the device copy below run asynchronously.
            pin = self.device.type == "cuda"
            x = torch.empty((B, T), dtype=self.input_dtype, pin_memory=pin)
            y = torch.empty((B, T), dtype=torch.int64, pin_memory=pin)
            if self._doc_starts is not None:
                self._starts[:] = self.window_starts(step).numpy()
                source.gather(self._starts, T, x.data_ptr(), self.input_dtype == torch.int32, y.data_ptr())
            else:
                source.sample_and_gather(
                    SAMPLING_IDS[self.sampling], self.seed & MASK64, step, self.rank * B, self.global_batch, T,
                    self._starts, x.data_ptr(), self.input_dtype == torch.int32, y.data_ptr(),
                    self.windows_per_chunk)
            if out_x is not None:
                return out_x.copy_(x, non_blocking=True), out_y.copy_(y, non_blocking=True)
            if self.device.type != "cpu":
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return x, y
        tokens = source.acquire(step)
        layout = self.ring_layout
        if self.backend == "triton":
            from gpuload.kernels.triton_gather import gather_batch_triton

            given = None if self._doc_starts is None else self.window_starts(step).to(self.device)
            x, y = gather_batch_triton(tokens, self.sampling, self.seed, step, self.rank * B, B, self.global_batch,
                                       self.num_tokens, T, out_x, out_y, self.input_dtype, chunking=self.chunking,
                                       num_slots=layout.num_slots, slot_tokens=layout.slot_tokens, device=self.device,
                                       starts=given)
        else:
            if self._doc_starts is not None:
                starts, visits = self.window_starts(step), None
            else:
                starts, visits = window_starts_and_visits(self.sampling, self.seed, step, self._rows,
                                                          self.global_batch, self.num_tokens, T, self.chunking)
            positions = source.ring_positions(starts, visits).to(tokens.device)
            bounds = torch.tensor([0, tokens.numel()], device=tokens.device)
            x, y = gather_reference([tokens], bounds, positions, T, self.input_dtype)
            if self.device != tokens.device:  # zero-copy placement: the torch reference reads the host ring
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if out_x is not None:
                x, y = out_x.copy_(x), out_y.copy_(y)
        source.release(step)
        return x, y

    @property
    def windows_per_chunk(self) -> int:
        """Windows per ring chunk of the chunked rule; 0 when the ring holds the whole stream."""
        return 0 if self.chunking is None else self.chunking.windows_per_chunk

    @property
    def align_bos(self) -> Optional[int]:
        """The token rows are aligned to (align='bos'), else None."""
        return self.bos_token if self.align else None

    def state_dict(self) -> dict:
        """Everything needed to continue the same batch stream; plain data (JSON-serializable)."""
        return {
            "format": STATE_FORMAT, "step": self.step, "seed": self.seed, "sampling": self.sampling,
            "seq_len": self.seq_len, "global_batch": self.global_batch,
            "num_tokens": self.num_tokens, "dataset": self.fingerprint,
            "windows_per_chunk": self.windows_per_chunk, "align_bos": self.align_bos,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; refuses a state of another dataset, seq_len, global batch or sampling mode."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a gpuload loader state (expected format {STATE_FORMAT!r}): {state!r:.200}")
        missing = [key for key in STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"gpuload loader state is missing {', '.join(missing)}; was it saved by state_dict()?")
        for key in ("step", "seed", "seq_len", "global_batch", "num_tokens", "windows_per_chunk"):
            if type(state[key]) is not int:
                raise ValueError(f"gpuload loader state: {key} must be an integer, found {state[key]!r}")
        checks = [
            ("dataset", state["dataset"], self.fingerprint,
             f"the state was saved on another dataset ({state['num_tokens']} tokens) than this one "
             f"({self.num_tokens} tokens); pass the same shards in the same order"),
            ("seq_len", state["seq_len"], self.seq_len, "construct the loader with the saved seq_len"),
            ("global_batch", state["global_batch"], self.global_batch,
             "world_size * batch_size must equal the saved global batch (elastic resume keeps it)"),
            ("sampling", state["sampling"], self.sampling, "construct the loader with the saved sampling mode"),
            ("align_bos (the bos_token rows are aligned to, None = not aligned)", state["align_bos"],
             self.align_bos, "construct the loader with the saved align and bos_token"),
        ]
        if self.sampling != "sequential":  # sequential batches do not depend on the ring's chunks
            checks.append(("ring chunking (windows_per_chunk, 0 = whole stream)", state["windows_per_chunk"],
                           self.windows_per_chunk,
                           "construct the loader with the saved ring_tokens: with a ring smaller than the stream, "
                           "random and shuffle batches depend on its chunks"))
        for name, saved, current, advice in checks:
            if saved != current:
                raise ValueError(f"cannot load loader state: {name} differs (saved {saved!r}, this loader "
                                 f"{current!r}): {advice}")
        check_domain(state["step"], self.global_batch, self.num_tokens)
        if self._ring is not None and state["seed"] != self.seed:
            self._ring.reset(state["seed"])
        self.seed = state["seed"]
        self.step = state["step"]

    def close(self) -> None:
        """Stop the ring's filler, free the ring and release the shards (a batch in flight completes)."""
        self._source = None
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"GPULoader(B={self.batch_size}, T={self.seq_len}, sampling={self.sampling!r}, seed={self.seed}, "
                f"rank={self.rank}/{self.world_size}, tokens={self.num_tokens}, backend={self.backend!r}, "
                f"device={self.device}, ring={self.ring_layout.ring_tokens} tokens"
                f"{'' if self.chunking is None else f' in chunks of {self.chunking.windows_per_chunk} windows'})")

