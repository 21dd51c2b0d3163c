"""Loading a Hugging Face MoE checkpoint straight into an expert-parallel model
(:func:`load_pretrained_expert_parallel`, re-exported by :mod:`moeops.distributed`): each rank
reads only its own experts' tensors.

The checkpoint layout of each family's experts (hub format: one tensor per expert and
projection, its per-expert ``(gate, up, down)`` names) and the renames from checkpoint keys to
transformers 5.x module names come from :data:`moeops.models.FAMILIES` (``expert_weights``,
``checkpoint_renames``); the loader takes the families :func:`moeops.patch` takes on
transformers 5.x (``patch``).
"""

from __future__ import annotations

import json
import os
import re

import torch

from moeops.distributed.expert_parallel import group_info, patch_expert_parallel
from moeops.integrations import hf
from moeops.models import FAMILIES

__all__ = ["load_pretrained_expert_parallel", "checkpoint_files"]


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a local checkpoint directory (from its
    ``model.safetensors.index.json``, else its one ``model.safetensors``)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, name) for name in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"moeops: no model.safetensors(.index.json) in {path!r} (a local "
                            "directory of a safetensors checkpoint is needed)")


def load_pretrained_expert_parallel(path: str, group=None, expert_to_rank=None, *,
                                    dtype: torch.dtype | None = None, model_class=None,
                                    combine_dtype: torch.dtype | None = None,
                                    **config_kwargs) -> torch.nn.Module:
    """Load a Hugging Face MoE checkpoint (a local safetensors directory, hub layout: one tensor
    per expert) straight into an expert-parallel model: each rank reads the non-expert tensors
    and *only its own experts' tensors*; no rank ever holds all experts.

    The model is built from its config with the experts modules on the meta device (no memory),
    patched and sharded as :func:`patch_expert_parallel` does, then filled from the checkpoint:
    each local expert's ``gate``/``up``/``down`` tensors are read and stacked into the local
    ``gate_up_proj`` / ``down_proj``; other experts' tensors are skipped unread. ``dtype``
    converts every tensor (default: as stored). ``model_class`` defaults to
    ``transformers.AutoModelForCausalLM``; ``config_kwargs`` go to ``AutoConfig.from_pretrained``.
    Supports the transformers 5.x model types of :mod:`moeops.integrations.hf` (gated experts
    without biases). Returns the model in eval mode; ``model._moeops_ep_load`` counts what was
    read (``expert_tensors_read``, ``expert_tensors_skipped``, ``other_tensors``).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    model_type = config.model_type
    family = FAMILIES.get(model_type)
    if family is None or not family.patch:
        raise hf.unsupported(f"model type {model_type!r} has no expert-parallel loader")
    _, experts_cls = hf.model_classes(model_type)
    rank, world = group_info(group)

    original_init = experts_cls.__init__

    def meta_init(self, *args, **kwargs):  # the experts' stacked tensors: shapes only
        with torch.device("meta"):
            original_init(self, *args, **kwargs)

    experts_cls.__init__ = meta_init
    try:
        model = model_class.from_config(config)
    finally:
        experts_cls.__init__ = original_init
    if dtype is not None:
        model = model.to(dtype)
    patch_expert_parallel(model, group, expert_to_rank, combine_dtype=combine_dtype)

    gate_n, up_n, down_n = family.expert_weights
    pattern = re.compile(r"^(.*\.experts)\.(\d+)\.(" + "|".join((gate_n, up_n, down_n))
                         + r")\.weight$")
    experts_modules = {name: m for name, m in model.named_modules()
                       if hasattr(m, "_moeops_ep_shard")}
    local_index = {
        name: {e: i for i, e in enumerate(m._moeops_ep_shard[0].local_experts(rank))}
        for name, m in experts_modules.items()}
    parts: dict[str, dict[tuple[int, str], torch.Tensor]] = {n: {} for n in experts_modules}
    state, read, skipped = {}, 0, 0
    for file in checkpoint_files(path):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                name = key
                for old, new in family.checkpoint_renames:
                    name = name.replace(old, new)
                m = pattern.match(name)
                if m is None:
                    t = f.get_tensor(key)
                    state[name] = t.to(dtype) if dtype is not None else t
                    continue
                module, e, proj = m.group(1), int(m.group(2)), m.group(3)
                if module not in experts_modules:
                    raise KeyError(f"moeops: checkpoint key {key!r} names experts module "
                                   f"{module!r}, which this model does not have")
                i = local_index[module].get(e)
                if i is None:
                    skipped += 1
                    continue
                t = f.get_tensor(key)
                parts[module][(i, proj)] = t.to(dtype) if dtype is not None else t
                read += 1
    for module, got in parts.items():
        n_local = len(local_index[module])
        missing = [(i, p) for i in range(n_local) for p in (gate_n, up_n, down_n)
                   if (i, p) not in got]
        if missing:
            raise KeyError(f"moeops: the checkpoint lacks local expert tensors of {module}: "
                           f"(local index, projection) {missing[:4]}")
        mod = experts_modules[module]
        if n_local:
            state[module + ".gate_up_proj"] = torch.stack(
                [torch.cat([got[(i, gate_n)], got[(i, up_n)]]) for i in range(n_local)])
            state[module + ".down_proj"] = torch.stack([got[(i, down_n)] for i in range(n_local)])
        else:  # nothing local: empty tensors of the right trailing shape
            for p in ("gate_up_proj", "down_proj"):
                ref = getattr(mod, p)
                state[module + "." + p] = torch.empty(ref.shape, dtype=dtype or ref.dtype)
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = set()
    if getattr(config, "tie_word_embeddings", False) or getattr(
            getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False):
        model.tie_weights()
        tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise KeyError(f"moeops: checkpoint and model do not match: missing {missing[:6]}, "
                       f"unexpected {result.unexpected_keys[:6]}")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise RuntimeError(f"moeops: parameters left unloaded: {meta[:6]}")
    model._moeops_ep_load = {"expert_tensors_read": read, "expert_tensors_skipped": skipped,
                             "other_tensors": len(state) - 2 * len(parts)}
    return model.eval()
