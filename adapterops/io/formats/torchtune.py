"""LoRA adapters as torchtune keeps them: the `adapter_model.pt` its checkpointers save (a state dict, loaded with
`torch.load(weights_only=True)` as `checkpointer.adapter_checkpoint`) and the `adapter_config.json` beside it.

Keys: `layers.{i}.attn.{q_proj,k_proj,v_proj,output_proj}.lora_{a,b}.weight`, `layers.{i}.mlp.{w1,w2,w3}` (gate,
down, up) and `output` (lm_head), with PEFT's shapes. torchtune's LoRA has one `lora_rank` and one `lora_alpha` for
the whole model (scale α/r, no rsLoRA), and its builders put LoRA on the same modules in every block
(`lora_attn_modules`, `apply_lora_to_mlp` for all of w1/w2/w3, `apply_lora_to_output`). Llama-family models keep q
and k rows interleaved per head (convert_weights.hf_to_tune's `_permute`), so their lora_B is permuted alike;
Qwen2 is not permuted (qwen2_hf_to_tune). torchtune has `tune_to_peft_adapter_weights` but no inverse, and that
function permutes q/k for every model, Qwen2 included.
"""

from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path

import torch

from adapterops.core.heads import from_interleaved, heads_problem, to_interleaved
from adapterops.errors import AdapteropsError
from adapterops.io.checkpoint import refuse_pickle
from adapterops.io.formats import (
    ArchInfo,
    Factors,
    FormatAdapter,
    check_factors,
    foreign_number,
    split_module,
)
from adapterops.io.jsonfile import read_json_object, write_json
from adapterops.io.paths import safe_file
from adapterops.io.safetensors_io import SafetensorsFile

WEIGHTS = "adapter_model.pt"
SAFETENSORS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
# transformers model_type → whether torchtune interleaves q/k rows
ARCHS = {"llama": True, "mistral": True, "qwen2": False}
HF_TO_TUNE = {"self_attn.q_proj": "attn.q_proj", "self_attn.k_proj": "attn.k_proj", "self_attn.v_proj": "attn.v_proj",
              "self_attn.o_proj": "attn.output_proj", "mlp.gate_proj": "mlp.w1", "mlp.down_proj": "mlp.w2",
              "mlp.up_proj": "mlp.w3"}
TUNE_TO_HF = {v: k for k, v in HF_TO_TUNE.items()}
ATTN = {"self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj", "self_attn.v_proj": "v_proj",
        "self_attn.o_proj": "output_proj"}
MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PEFT_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "output_proj": "o_proj",
              "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}
KEY = re.compile(r"^(?:layers\.(\d+)\.(attn\.(?:q_proj|k_proj|v_proj|output_proj)|mlp\.w[123])|(output))"
                 r"\.lora_([ab])\.weight$")


def _has_tune_keys(folder: Path) -> bool:
    """Whether the folder's adapter_model.safetensors (a regular file by the file rule) has torchtune's keys."""
    try:
        with SafetensorsFile(safe_file(folder, SAFETENSORS)) as f:
            return any(KEY.match(k) for k in f.keys())
    except Exception:  # noqa: BLE001 - an unusable file is simply not torchtune's; the PEFT reader says why
        return False


def is_torchtune_folder(path: Path) -> bool:
    """Whether a folder holds a torchtune adapter: adapter_model.pt without PEFT weights, or torchtune keys in
    adapter_model.safetensors."""
    if os.path.lexists(path / WEIGHTS) and not os.path.lexists(path / SAFETENSORS) \
            and not os.path.lexists(path / "adapter_model.bin"):
        return True
    return os.path.isfile(path / SAFETENSORS) and _has_tune_keys(path)


def module_name(module: str) -> str:
    """torchtune's name for a transformers module (`layers.0.attn.q_proj`, `output`)."""
    block, leaf = split_module(module)
    if block is None:
        if leaf == "lm_head":
            return "output"
    elif leaf in HF_TO_TUNE:
        return f"layers.{block}.{HF_TO_TUNE[leaf]}"
    raise AdapteropsError(f"module {module} has no LoRA in torchtune's decoder (q/k/v/output_proj, w1/w2/w3, output)")


def _permuted(arch: ArchInfo, module: str) -> int | None:
    """The head count whose rows torchtune interleaves for this module, or None."""
    leaf = split_module(module)[1]
    if not ARCHS.get(arch.model_type, False) or leaf not in ("self_attn.q_proj", "self_attn.k_proj"):
        return None
    return arch.num_heads if leaf == "self_attn.q_proj" else arch.num_kv_heads


def builder_args(modules: list[str]) -> dict[str, object]:
    """The LoRA arguments of torchtune's model builders that create exactly these modules' LoRA (in every block)."""
    leaves = {split_module(m)[1] for m in modules}
    return {"lora_attn_modules": [ATTN[k] for k in ATTN if k in leaves],
            "apply_lora_to_mlp": any(k in leaves for k in MLP),
            "apply_lora_to_output": "lm_head" in leaves}


def write_torchtune(out: Path, arch: ArchInfo, modules: dict[str, Factors], *, rank: int, alpha: float) -> dict[str, object]:
    """Write factors (all of rank `rank`, scale α/r applying to all) as adapter_model.pt + adapter_config.json."""
    if arch.model_type not in ARCHS:
        raise AdapteropsError(f"model_type {arch.model_type!r}: torchtune conversion supports {', '.join(sorted(ARCHS))}",
                              file=arch.path)
    state: dict[str, torch.Tensor] = {}
    for module, f in modules.items():
        if f.rank != rank:
            raise AdapteropsError(f"module {module} has rank {f.rank}, not the adapter's {rank}")
        b = f.b
        heads = _permuted(arch, module)
        if heads is not None:
            problem = heads_problem(b.shape[0], heads)
            if problem:
                raise AdapteropsError(f"cannot interleave q/k rows of module {module}: {problem}")
            b = to_interleaved(b, heads)
        name = module_name(module)
        state[f"{name}.lora_a.weight"] = f.a.contiguous().clone()
        state[f"{name}.lora_b.weight"] = b.contiguous().clone()
    torch.save(state, out / WEIGHTS)
    args = builder_args(list(modules))
    targets = args["lora_attn_modules"] + (["w1", "w2", "w3"] if args["apply_lora_to_mlp"] else []) + (
        ["output"] if args["apply_lora_to_output"] else [])
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha,
              "target_modules": [PEFT_NAMES[t] for t in targets],  # as torchtune's checkpointer writes it
              "torchtune": {"model_type": arch.model_type, "lora_rank": rank, "lora_alpha": alpha, **args}}
    write_json(out / CONFIG, config)
    return config


def _load_state(path: Path, allow_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    """The adapter's tensors: adapter_model.safetensors when there is one, else adapter_model.pt, a pickle, loaded
    (with torch.load(weights_only=True)) only when the user allows pickles, as every other reader does."""
    if os.path.lexists(path / SAFETENSORS) or not os.path.lexists(path / WEIGHTS):
        weights = safe_file(path, SAFETENSORS)
        with SafetensorsFile(weights) as f:
            state = {k: f.read(k).clone() for k in f.keys()}
    else:
        weights = safe_file(path, WEIGHTS)
        refuse_pickle(weights, allow_pickle)
        if not zipfile.is_zipfile(weights):
            raise AdapteropsError("not a torch.save zip archive", file=weights)
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - the restricted unpickler raises many types
            raise AdapteropsError(f"cannot load as a tensor state dict ({type(exc).__name__})", file=weights) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise AdapteropsError("does not hold a state dict of tensors", file=weights)
    return weights, state


def read_torchtune(path: Path, arch: ArchInfo | None = None, allow_pickle: bool = False) -> FormatAdapter:
    """Read a torchtune adapter folder into transformers-named factors (q/k rows restored when `arch` is given);
    its adapter_model.pt is a pickle, loaded only with `allow_pickle`."""
    weights, state = _load_state(path, allow_pickle)
    cfg: dict[str, object] = {}
    if os.path.lexists(path / CONFIG):
        cfg = read_json_object(safe_file(path, CONFIG))
    tune_cfg = cfg.get("torchtune") if isinstance(cfg.get("torchtune"), dict) else {}
    rank = tune_cfg.get("lora_rank", cfg.get("r"))
    alpha = tune_cfg.get("lora_alpha", cfg.get("lora_alpha"))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = KEY.match(key)
        if m is None:
            what = "DoRA magnitude" if key.endswith(".magnitude") else "not a LoRA tensor torchtune's decoder has"
            raise AdapteropsError(f"{what}: not supported", file=weights, tensor=key)
        module = "lm_head" if m.group(3) else f"model.layers.{m.group(1)}.{TUNE_TO_HF[m.group(2)]}"
        parts.setdefault(module, {})[m.group(4)] = value
    for name, v in (("rank", rank), ("alpha", alpha)):
        if v is None:
            raise AdapteropsError(f"lora {name} is missing from {CONFIG} (torchtune keeps it in the recipe: give "
                                  f"\"torchtune\": {{\"lora_rank\": R, \"lora_alpha\": A}})", file=path / CONFIG)
    rank = foreign_number(rank, "torchtune.lora_rank" if "lora_rank" in tune_cfg else "r", path / CONFIG, integer=True)
    alpha = foreign_number(alpha, "torchtune.lora_alpha" if "lora_alpha" in tune_cfg else "lora_alpha", path / CONFIG)
    modules: dict[str, Factors] = {}
    interleaved = False
    for module, ab in sorted(parts.items(), key=lambda kv: (split_module(kv[0])[0] or -1, kv[0])):
        if set(ab) != {"a", "b"}:
            raise AdapteropsError(f"module {module} lacks lora_{'a' if 'a' not in ab else 'b'}", file=weights)
        a, b = ab["a"], ab["b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] != rank:
            raise AdapteropsError(f"lora_a {list(a.shape)} and lora_b {list(b.shape)} do not match rank {rank}",
                                  file=weights, tensor=module_name(module))
        tune = module_name(module)
        check_factors(module, a, b, alpha / rank, weights, (f"{tune}.lora_a.weight", f"{tune}.lora_b.weight"))
        heads = _permuted(arch, module) if arch is not None else None
        if arch is None and split_module(module)[1] in ("self_attn.q_proj", "self_attn.k_proj"):
            interleaved = tune_cfg.get("model_type", "llama") in (m for m, p in ARCHS.items() if p)
        if heads is not None:
            problem = heads_problem(b.shape[0], heads)
            if problem:
                raise AdapteropsError(f"cannot restore q/k rows of module {module}: {problem}", file=weights)
            b = from_interleaved(b, heads)
        modules[module] = Factors(a.contiguous(), b.contiguous(), float(alpha) / int(rank))
    info = {"rank": int(rank), "alpha": float(alpha), "model_type": tune_cfg.get("model_type"),
            **{k: tune_cfg[k] for k in ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output") if k in tune_cfg}}
    return FormatAdapter("torchtune", weights, modules, info, interleaved)
