"""gpuload: (B, T) input/target token batches for GPT-style pretraining, per DDP rank, on the GPU."""

__version__ = "0.1.0"

# Loaded on first use: `gpuload prepare` / `inspect` and their worker processes need no torch import.
_EXPORTS = {
    "GPULoader": ("gpuload.loader", "GPULoader"),
    "TokenStream": ("gpuload.shards", "TokenStream"),
    "open_shard": ("gpuload.shards", "open_shard"),
    "write_shard": ("gpuload.shards", "write_shard"),
    "native_available": ("gpuload.native", "available"),
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gpuload' has no attribute {name!r}")
    import importlib

    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
