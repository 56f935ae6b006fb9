"""A Triton kernel launch prepared once for the per-step path: the cheapest route Triton offers.

`kernel[grid](*args)` costs ~30 us of host time per call (triton 3.9, 2-core VM): binding and
specializing every argument, re-checking the kernel's constexpr globals, building the cache key. A
loader launches the same variant every step with only a few arguments changed, so `PreparedLaunch`
does that work once: it compiles (or fetches) the variant for the first step's arguments with
`JITFunction.warmup`, loads it on the device, and from then on calls the compiled kernel's launcher
directly with the argument list it keeps, exactly as Triton's own `JITFunction.run` does after its
cache lookup (same order: every parameter, constexprs included, then the launcher's hooks). Device
tensors are passed as their addresses (the launcher takes an int as a device pointer and skips its
per-pointer driver query); pinned host tensors stay tensors, so the launcher maps them to their device
address. Under Triton's CPU interpreter there is no compiled kernel, and the launch goes through
`kernel[grid]` with tensors.

Only arguments Triton does not specialize on may change between launches: do_not_specialize scalars
(step, seed, ...) and pointers whose alignment stays 16 bytes (torch's allocations are). The caller
names them with `slot(name)` and writes them with `set(slot, value)`.
"""

from __future__ import annotations

import contextlib

import torch

_INTERPRETED = "InterpretedFunction"


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (>= 1). Not triton.next_power_of_2: in triton 3.9 that is a
    ConstexprFunction costing ~4 us per call on the host."""
    return 1 << (max(n, 1) - 1).bit_length()


def is_interpreted(kernel) -> bool:
    return type(kernel).__name__ == _INTERPRETED


class PreparedLaunch:
    """`kernel[grid](**arguments)` with `options` (num_warps), ready to fire again and again on `device`."""

    def __init__(self, kernel, grid: int, arguments: dict, options: dict, device: torch.device):
        names = kernel.arg_names
        missing = [name for name in names if name not in arguments]
        if missing or len(arguments) != len(names):
            raise ValueError(f"PreparedLaunch of {kernel.__name__}: arguments must be exactly {names}, "
                             f"missing {missing}")
        self.kernel, self.grid, self.options, self.device = kernel, grid, dict(options), device
        self.cuda = device.type == "cuda"
        self.names = list(names)
        self.compiled = None
        if is_interpreted(kernel):
            self.values = [arguments[name] for name in names]
            return
        from triton import knobs

        self._knobs = knobs.runtime
        constexprs = {p.name for p in kernel.params if p.is_constexpr}
        positional = [arguments[name] for name in names if name not in constexprs]
        with torch.cuda.device(device) if self.cuda else contextlib.nullcontext():
            compiled = kernel.warmup(*positional, grid=(grid,), **{name: arguments[name] for name in constexprs},
                                     **self.options)
            self._run = compiled.run  # creates the launcher and loads the module on this device
        self.compiled = compiled
        self.function, self.packed = compiled.function, compiled.packed_metadata
        self.values = [self._as_argument(arguments[name]) for name in names]

    def _as_argument(self, value):
        if isinstance(value, torch.Tensor) and (value.device.type != "cpu" or not self.cuda):
            return value.data_ptr()
        return value  # a pinned host tensor (zero-copy): the launcher looks up its device address

    def slot(self, name: str) -> int:
        return self.names.index(name)

    def set(self, slot: int, value) -> None:
        """Argument `slot` for the next launches; a tensor on the launch's device goes in as its address."""
        if self.compiled is not None and isinstance(value, torch.Tensor):
            value = self._as_argument(value)
        self.values[slot] = value

    def set_device_tensor(self, slot: int, tensor: torch.Tensor) -> None:
        """`set` for a tensor known to be in device memory (the per-step outputs): no device lookup."""
        self.values[slot] = tensor if self.compiled is None else tensor.data_ptr()

    def __call__(self) -> None:
        """Launch on the current stream of the launch's device (made current for the call if it is not)."""
        if self.compiled is None:
            self.kernel[(self.grid,)](*self.values, **self.options)
            return
        if self.cuda:
            index = self.device.index
            if torch._C._cuda_getDevice() != index:  # Triton launches in the current device's context
                with torch.cuda.device(index):
                    self._launch(torch._C._cuda_getCurrentRawStream(index))
                return
            self._launch(torch._C._cuda_getCurrentRawStream(index))
        else:  # compiled for a GPU target on a machine without one (gpuload.kernels.offline): no stream
            self._launch(0)

    def _launch(self, stream: int) -> None:
        enter, leave = self._knobs.launch_enter_hook, self._knobs.launch_exit_hook
        if _listening(enter) or _listening(leave):  # a profiler: give it what JITFunction.run gives it
            metadata = self.compiled.launch_metadata((self.grid,), stream, *self.values)
        else:
            metadata, enter, leave = None, None, None
        self._run(self.grid, 1, 1, stream, self.function, self.packed, metadata, enter, leave, *self.values)


def _listening(hook) -> bool:
    """Whether a launch hook would do anything (Triton's HookChain, or a callable set in its place)."""
    return hook is not None and bool(getattr(hook, "calls", True))
