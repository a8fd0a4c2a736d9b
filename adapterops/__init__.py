"""adapterops: surgery on model checkpoints and LoRA adapters — merge, rescale, re-rank, analyse, quantize."""

from adapterops.errors import AdapteropsError
from adapterops.merge import MergeResult, merge

__version__ = "0.1.0"
__all__ = ["AdapteropsError", "MergeResult", "merge", "__version__"]
