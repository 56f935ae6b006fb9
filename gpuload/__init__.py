"""gpuload: (B, T) input/target token batches for GPT-style pretraining, per DDP rank, on the GPU."""

from gpuload.loader import GPULoader
from gpuload.native import available as native_available
from gpuload.shards import TokenStream, open_shard, write_shard

__version__ = "0.1.0"
__all__ = ["GPULoader", "TokenStream", "open_shard", "write_shard", "native_available", "__version__"]
