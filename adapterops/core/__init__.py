"""Pure tensor maths: no files, no configs on disk. Everything here takes and returns tensors and numbers."""
