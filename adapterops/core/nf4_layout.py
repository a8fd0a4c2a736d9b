"""The NF4 format's block sizes, without torch: the kernels check them and the CLI offers them as choices."""

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
NESTED_BLOCKSIZE = 256  # double quantization: absmax is quantized to 8 bits in blocks of this many
