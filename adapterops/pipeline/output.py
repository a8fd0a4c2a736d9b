"""The files around the tensors in an output checkpoint folder: the shard index, config.json and the base's other
files (tokenizer, chat template, ...)."""

from __future__ import annotations

from pathlib import Path

from adapterops.io.atomic import copy_file
from adapterops.io.jsonfile import write_json


def write_index_and_files(out: Path, write_index: bool, weight_map: dict[str, str], index_metadata: dict,
                          extra_files: list[Path], config: dict | None) -> None:
    """The index (when sharded), the config (rewritten when changed) and every other file of the base."""
    if write_index:
        write_json(out / "model.safetensors.index.json", {"metadata": index_metadata, "weight_map": weight_map})
    for path in extra_files:
        if path.name == "config.json" and config is not None:
            write_json(out / "config.json", config, sort_keys=True)
        else:
            copy_file(path, out)
