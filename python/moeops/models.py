"""The one table of MoE model families and layer shapes moeops knows.

* :data:`FAMILIES`: Hugging Face transformers model types: where their classes live (config,
  experts, router, sparse MoE block), what :func:`moeops.patch` does with them on transformers
  5.x and 4.x, and the per-expert weight names of their checkpoints (also the 4.x ModuleList
  experts' linear names).
* :data:`LAYERS`: one MoE layer of real models (values of their ``config.json``), the shapes the
  benchmarks run and the docs quote.

Everything else reads these: :mod:`moeops.integrations.hf` (what can be patched),
:mod:`moeops.distributed` (checkpoint names), :mod:`moeops.bench` (shapes, and how to build a
real experts module of a shape), ``bench/`` (pytest-benchmark suites). Adding a family or a
shape is one entry here.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["Family", "FAMILIES", "LayerShape", "LAYERS", "family", "layer",
           "patchable_types", "patchable_types_v4"]


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face transformers MoE model type."""

    model_type: str  #: ``config.model_type``
    module: str  #: the modeling module, e.g. ``transformers.models.mixtral.modeling_mixtral``
    config: str  #: config class name
    experts: str  #: transformers 5.x experts class (stacked 3-D expert tensors)
    router: str  #: transformers 5.x router class
    sparse_block: str  #: the sparse MoE block class (5.x and 4.x names agree)
    #: per-expert (gate, up, down) linear names: hub checkpoints, 4.x ModuleList experts
    expert_weights: tuple[str, str, str]
    #: config keyword -> :class:`LayerShape` field, to build an experts module of a given shape
    shape_fields: Mapping[str, str]
    #: (old, new) substrings from checkpoint keys to transformers 5.x module names
    checkpoint_renames: tuple[tuple[str, str], ...] = ()
    #: :func:`moeops.patch` takes it on transformers 5.x (router and experts)
    patch: bool = True
    #: :func:`moeops.patch` takes it on transformers 4.x (its sparse block)
    patch_v4: bool = False
    #: the 5.x sparse block is patched too: its sigmoid-gated shared expert is fused into the
    #: experts' combine (Qwen2-MoE)
    fused_shared_expert: bool = False
    #: the router scores with a sigmoid, selection-only bias and group-limited top-k
    #: (DeepSeek-V3 style); otherwise softmax top-k
    sigmoid_router: bool = False

    def modeling(self):
        """The imported modeling module (imports transformers)."""
        return importlib.import_module(self.module)

    def cls(self, name: str):
        """A class of the modeling module by name (``family.cls(family.experts)``)."""
        return getattr(self.modeling(), name)

    def config_class(self):
        """The config class (from the family's ``configuration_*`` module)."""
        mod = importlib.import_module(self.module.replace(".modeling_", ".configuration_"))
        return getattr(mod, self.config)


def _family(model_type: str, prefix: str, **kw) -> Family:
    base = dict(module=f"transformers.models.{model_type}.modeling_{model_type}",
                config=f"{prefix}Config", experts=f"{prefix}Experts",
                router=f"{prefix}TopKRouter", sparse_block=f"{prefix}SparseMoeBlock",
                expert_weights=("gate_proj", "up_proj", "down_proj"))
    base.update(kw)
    return Family(model_type=model_type, **base)


FAMILIES: Mapping[str, Family] = MappingProxyType({f.model_type: f for f in (
    _family("mixtral", "Mixtral", expert_weights=("w1", "w3", "w2"),
            shape_fields={"num_local_experts": "E", "intermediate_size": "I"},
            checkpoint_renames=((".block_sparse_moe.", ".mlp."),), patch_v4=True),
    _family("qwen2_moe", "Qwen2Moe",
            shape_fields={"num_experts": "E", "moe_intermediate_size": "I",
                          "shared_expert_intermediate_size": "I_shared"},
            patch_v4=True, fused_shared_expert=True),
    _family("qwen3_moe", "Qwen3Moe",
            shape_fields={"num_experts": "E", "moe_intermediate_size": "I"}),
    _family("olmoe", "Olmoe", shape_fields={"num_experts": "E", "intermediate_size": "I"}),
    _family("deepseek_v2", "DeepseekV2", router="DeepseekV2TopkRouter",
            sparse_block="DeepseekV2Moe",
            shape_fields={"n_routed_experts": "E", "moe_intermediate_size": "I"}, patch=False),
    _family("deepseek_v3", "DeepseekV3", router="DeepseekV3TopkRouter",
            sparse_block="DeepseekV3MoE",
            shape_fields={"n_routed_experts": "E", "moe_intermediate_size": "I"},
            sigmoid_router=True),
)})


def family(model_type: str) -> Family:
    """The :class:`Family` of ``model_type``; KeyError naming the known ones otherwise."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise KeyError(f"moeops: unknown model type {model_type!r}; known: "
                       f"{', '.join(sorted(FAMILIES))}") from None


def patchable_types() -> list[str]:
    """Model types :func:`moeops.patch` takes with transformers 5.x, sorted."""
    return sorted(t for t, f in FAMILIES.items() if f.patch)


def patchable_types_v4() -> list[str]:
    """Model types :func:`moeops.patch` takes with transformers 4.x, sorted."""
    return sorted(t for t, f in FAMILIES.items() if f.patch_v4)


@dataclasses.dataclass(frozen=True)
class LayerShape:
    """One MoE layer of a real model (its ``config.json`` values)."""

    name: str  #: e.g. ``"qwen3-30b-a3b"``
    family: str  #: model type of :data:`FAMILIES` whose experts module holds these experts
    E: int  #: routed experts
    K: int  #: experts per token (top-k)
    H: int  #: hidden size
    I: int  #: routed expert width (moe_intermediate_size)  # noqa: E741
    I_shared: int = 0  #: shared expert width in the benchmarks (0: none)
    n_group: int = 1  #: router groups (DeepSeek-V3 group-limited routing)
    topk_group: int = 1  #: groups kept per token
    #: too large for a CPU benchmark (DeepSeek-V3: 22.5 GB of bf16 expert weights)
    gpu_only: bool = False
    #: attention shape for whole-model benchmarks (0: not recorded)
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


LAYERS: Mapping[str, LayerShape] = MappingProxyType({s.name: s for s in (
    LayerShape("qwen3-30b-a3b", "qwen3_moe", E=128, K=8, H=2048, I=768, heads=32, kv_heads=4,
               head_dim=128),
    LayerShape("olmoe-1b-7b", "olmoe", E=64, K=8, H=2048, I=1024),
    # one shared expert of width 5632 behind a sigmoid gate
    LayerShape("qwen1.5-moe-a2.7b", "qwen2_moe", E=60, K=4, H=2048, I=1408, I_shared=5632),
    LayerShape("mixtral-8x7b", "mixtral", E=8, K=2, H=4096, I=14336),
    # also 2 shared experts (2 x 1408) and a dense first layer: the benchmarks time the routed
    # experts only
    LayerShape("deepseek-v2-lite", "deepseek_v2", E=64, K=6, H=2048, I=1408),
    LayerShape("deepseek-v3", "deepseek_v3", E=256, K=8, H=7168, I=2048, n_group=8,
               topk_group=4, gpu_only=True),
)})


def layer(name: str) -> LayerShape:
    """The :class:`LayerShape` called ``name``; ValueError naming the known ones otherwise."""
    try:
        return LAYERS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(LAYERS)}") from None
