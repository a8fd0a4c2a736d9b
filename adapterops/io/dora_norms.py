"""The DoRA sidecar: the row norms ‖W + ΔW‖ that `merge` used, kept so that `unmerge` can recover W exactly.

A merged DoRA weight W' = (m / ‖W + ΔW‖) ⊙ (W + ΔW) has rows of norm m: the factor ‖W + ΔW‖ / m is not in the
checkpoint, so without it no unmerge can be exact. `merge` writes the norms (float32, one small tensor per DoRA
module) into this file beside the merged weights; its name does not end in `.safetensors`, so loaders that glob
for weight files (vLLM) never pick it up.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from adapterops.errors import AdapteropsError
from adapterops.io.paths import safe_file
from adapterops.io.safetensors_io import SafetensorsFile, save_file

SIDECAR_NAME = "dora_norms.adapterops"
FORMAT = "adapterops-dora-norms"


def norm_key(adapter_index: int, module: str) -> str:
    """The sidecar key of one DoRA module of the adapter at this position in the merge."""
    return f"{adapter_index}/{module}"


def write_dora_norms(folder: Path, norms: dict[str, torch.Tensor], adapters: list[str]) -> None:
    """Write the sidecar (float32 norms, with the merged adapters' paths in its metadata)."""
    meta = {"format": FORMAT, "version": "1", "adapters": json.dumps(adapters)}
    save_file({k: v.float().reshape(-1).contiguous() for k, v in norms.items()}, folder / SIDECAR_NAME, meta)


def read_dora_norms(folder: Path) -> dict[str, torch.Tensor] | None:
    """The sidecar's norms, or None when the folder has none."""
    if not os.path.lexists(folder / SIDECAR_NAME):
        return None
    path = safe_file(folder, SIDECAR_NAME)  # a FIFO or a symlink out of the folder is an error, not "no sidecar"
    with SafetensorsFile(path) as f:
        if f.metadata.get("format") != FORMAT:
            raise AdapteropsError(f"not an adapterops DoRA sidecar (format {f.metadata.get('format')!r})", file=path)
        return {k: f.read(k).float().clone() for k in f.keys()}
