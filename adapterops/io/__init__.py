"""The I/O layer: checkpoints, adapters, the Hub, safetensors reading/writing and atomic output folders."""
