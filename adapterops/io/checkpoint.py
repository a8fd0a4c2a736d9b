"""Base checkpoints: one safetensors file, a folder with `model.safetensors`, or shards with an index.

Opening a checkpoint reads and checks every header and the index (shard paths must stay inside the folder), but
no tensor data; tensors are read one at a time with `read`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from adapterops.errors import AdapteropsError
from adapterops.io.dora_norms import SIDECAR_NAME
from adapterops.io.jsonfile import read_json_object
from adapterops.io.paths import regular_file, safe_file
from adapterops.io.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# architectures whose Linear layers are transformers Conv1D, with weights stored (in, out)
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


class TensorSource(Protocol):
    """Anything that holds named tensors: a safetensors file or an unpickled state dict."""

    path: Path

    def keys(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]: ...


class SafetensorsSource(SafetensorsFile):
    """A safetensors file seen as a TensorSource."""

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype from the header, without reading data."""
        info = self.info(name)
        return info.shape, info.dtype


class PickleSource:
    """A torch pickle (`.bin`), loaded whole with `weights_only=True`; only used when the user allows pickles."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for bad pickles
            raise AdapteropsError(f"cannot load pickle with weights_only=True: {exc}", file=path) from None
        if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
            raise AdapteropsError("pickle does not hold a dict of tensors", file=path)
        self._tensors: dict[str, torch.Tensor] = data

    def keys(self) -> list[str]:
        """Tensor names in stored order."""
        return list(self._tensors)

    def read(self, name: str) -> torch.Tensor:
        """A copy of one tensor."""
        if name not in self._tensors:
            raise AdapteropsError("no such tensor", file=self.path, tensor=name)
        return self._tensors[name].clone()

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of one tensor."""
        t = self._tensors[name]
        return tuple(t.shape), t.dtype

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> PickleSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def refuse_pickle(path: Path, allow_pickle: bool) -> None:
    """Raise unless the user has allowed loading pickle files."""
    if not allow_pickle:
        raise AdapteropsError(
            "is a pickle file; adapterops never unpickles unless you pass --allow-pickle "
            "(it then loads with torch.load(weights_only=True)); prefer safetensors",
            file=path,
        )


def open_tensor_file(path: Path, allow_pickle: bool = False) -> TensorSource:
    """Open a safetensors file, or (only when allowed) a pickle."""
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path, allow_pickle)
        return PickleSource(path)
    return SafetensorsSource(path)


def safe_member(root: Path, name: str, what: str, index_path: Path) -> Path:
    """A file an index names, checked by the one file rule (io/paths.py): inside the folder, a regular file."""
    return safe_file(root, name, what, listed_in=index_path, folder="checkpoint folder")


@dataclass
class Checkpoint:
    """A base model checkpoint: its shards, which tensor lives where, and its config."""

    root: Path
    shards: dict[str, TensorSource]  # shard file name -> file, in output order
    weight_map: dict[str, str]  # tensor name -> shard file name
    index_path: Path | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    single_file: Path | None = None  # set when the checkpoint is one bare .safetensors file

    def keys(self) -> list[str]:
        """All tensor names, shard by shard, in file order."""
        return list(self.weight_map)

    def source(self, name: str) -> TensorSource:
        """The file holding a tensor."""
        try:
            return self.shards[self.weight_map[name]]
        except KeyError:
            raise AdapteropsError("no such tensor in the base checkpoint", file=self.root, tensor=name) from None

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype of a tensor, from its header."""
        return self.source(name).shape_dtype(name)

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor."""
        return self.source(name).read(name)

    def extra_files(self) -> list[Path]:
        """Top-level files that are not weights, the index or a DoRA sidecar: config, tokenizer, chat template, ...

        Each is checked by the file rule (io/paths.py) before anyone copies it: a symlink that leaves the folder, a
        FIFO or a device is an error, never copied. Sub-folders (and links to folders) are not copied.
        """
        if self.single_file is not None:
            return []
        skip = {self.index_path.name} if self.index_path else set()
        skip |= set(self.shards)
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name in skip or p.name.startswith(".") or p.is_dir():
                continue
            if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json") or p.name == SIDECAR_NAME:
                continue
            out.append(safe_file(self.root, p.name))
        return out

    def close(self) -> None:
        """Close every shard."""
        for s in self.shards.values():
            s.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# config.json fields adapterops reads, and what each must be when present (null allowed where transformers writes
# it); `text_config` (a multimodal model's language part) holds the same fields and is checked alike
_INT_FIELDS = ("num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads", "hidden_size",
               "n_embd", "head_dim", "vocab_size")


def _count(v: object) -> bool:
    return type(v) is int and v >= 0


CONFIG_FIELDS: dict[str, tuple[str, Any]] = {
    "model_type": ("a string", lambda v: isinstance(v, str)),
    "architectures": ("a list of strings (or null)", lambda v: v is None or (isinstance(v, list) and all(isinstance(a, str) for a in v))),
    "tie_word_embeddings": ("true or false (or null)", lambda v: v is None or isinstance(v, bool)),
    "quantization_config": ("an object (or null)", lambda v: v is None or isinstance(v, dict)),
    **{k: ("a non-negative integer (or null)", lambda v: v is None or _count(v)) for k in _INT_FIELDS},
    # a list per layer in some models (Gemma 3n)
    "intermediate_size": ("a non-negative integer or a list of them (or null)",
                          lambda v: v is None or _count(v) or (isinstance(v, list) and all(_count(x) for x in v))),
}


def check_config(cfg: dict[str, Any], path: Path, prefix: str = "") -> dict[str, Any]:
    """Refuse a config.json whose fields adapterops reads have the wrong type (`"model_type": ["llama"]`,
    `"architectures": [null]`): one error naming config.json and the field, instead of a crash or a silent
    misreading wherever the field is used. Returns the config."""
    for key, (want, ok) in CONFIG_FIELDS.items():
        if key in cfg and not ok(cfg[key]):
            value = cfg[key]
            raise AdapteropsError(f"field {prefix}{key} must be {want}, got {type(value).__name__} {value!r:.60}", file=path)
    text = cfg.get("text_config")
    if text is not None:
        if not isinstance(text, dict):
            raise AdapteropsError(f"field {prefix}text_config must be an object (or null), got {type(text).__name__}", file=path)
        check_config(text, path, f"{prefix}text_config.")
    return cfg


def read_config(path: Path) -> dict[str, Any]:
    """A model's config.json (already checked by the file rule), its fields checked (`check_config`): the one
    reader of config.json for checkpoints and the format converters' --base."""
    return check_config(read_json_object(path), path)


def conv1d_layout(ckpt: Checkpoint) -> bool | None:
    """Whether the model's Linear layers are GPT-2 Conv1D (weights stored (in, out)); None without a config.json."""
    if not ckpt.config:
        return None
    model_type = ckpt.config.get("model_type")
    return isinstance(model_type, str) and model_type in CONV1D_MODEL_TYPES


def _from_index(root: Path, index_path: Path, allow_pickle: bool) -> Checkpoint:
    """A sharded checkpoint described by an index file (already checked by the file rule)."""
    index = read_json_object(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise AdapteropsError("index has no weight_map", file=index_path)
    for tensor, shard_name in weight_map.items():
        if not isinstance(shard_name, str):
            raise AdapteropsError(f"the index gives a shard that is not a file name: {shard_name!r}", file=index_path, tensor=tensor)
    shards: dict[str, TensorSource] = {}
    try:
        for shard_name in sorted(set(weight_map.values())):
            path = safe_member(root, shard_name, "shard", index_path)
            shards[shard_name] = open_tensor_file(path, allow_pickle)
        ordered: dict[str, str] = {}
        for shard_name, src in shards.items():
            in_shard = set(src.keys())
            for tensor in sorted(n for n, s in weight_map.items() if s == shard_name):
                if tensor not in in_shard:
                    raise AdapteropsError(f"the index places this tensor in {shard_name}, which lacks it", file=index_path, tensor=tensor)
            for tensor in src.keys():
                listed = weight_map.get(tensor)
                if listed is None:  # a loader would silently drop it (or load it unannounced): refuse, never guess
                    raise AdapteropsError(f"this shard holds the tensor but the index {index_path.name} does not list it",
                                          file=root / shard_name, tensor=tensor)
                if listed != shard_name:
                    raise AdapteropsError(f"this shard holds the tensor but the index {index_path.name} places it in {listed}",
                                          file=root / shard_name, tensor=tensor)
                ordered[tensor] = shard_name
    except BaseException:
        for src in shards.values():
            src.close()
        raise
    meta = index.get("metadata") if isinstance(index.get("metadata"), dict) else {}
    return Checkpoint(root, shards, ordered, index_path=index_path, index_metadata=meta)


def _from_file(root: Path, path: Path, allow_pickle: bool, single: bool) -> Checkpoint:
    """A checkpoint made of one file (already checked by the file rule)."""
    src = open_tensor_file(path, allow_pickle)
    return Checkpoint(root, {path.name: src}, {k: path.name for k in src.keys()}, single_file=path if single else None)


def _open_folder(path: Path, allow_pickle: bool) -> Checkpoint:
    """The checkpoint a folder holds: its index, else its one weights file. Every file goes through the file rule,
    so a FIFO, a device or a symlink out of the folder where a weights file should be is an error, not skipped."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    singles = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and not p.is_dir())

    def here(name: str) -> bool:
        return os.path.lexists(path / name)

    if here("model.safetensors.index.json"):
        return _from_index(path, safe_file(path, "model.safetensors.index.json"), allow_pickle)
    if len(indexes) == 1:
        return _from_index(path, safe_file(path, indexes[0].name), allow_pickle)
    if here("model.safetensors"):
        return _from_file(path, safe_file(path, "model.safetensors"), allow_pickle, single=False)
    if len(singles) == 1:
        return _from_file(path, safe_file(path, singles[0].name), allow_pickle, single=False)
    if here("pytorch_model.bin.index.json") and allow_pickle:
        return _from_index(path, safe_file(path, "pytorch_model.bin.index.json"), allow_pickle)
    if len(pickles) == 1:
        return _from_file(path, safe_file(path, pickles[0].name), allow_pickle, single=False)
    raise AdapteropsError("no model.safetensors or model.safetensors.index.json here", file=path)


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> Checkpoint:
    """Open a base checkpoint from a folder or a single file (headers only)."""
    path = Path(path)
    if path.is_dir():
        ckpt = _open_folder(path, allow_pickle)
        if os.path.lexists(path / "config.json"):
            try:
                ckpt.config = read_config(safe_file(path, "config.json"))
            except BaseException:
                ckpt.close()
                raise
    elif os.path.lexists(path):  # the user named this file: any symlink is followed, but it must be a regular file
        ckpt = _from_file(path.parent, regular_file(path, "checkpoint file"), allow_pickle, single=True)
    else:
        raise AdapteropsError("no such file or folder", file=path)
    return ckpt
