"""Hugging Face transformers integration (5.x; Mixtral and Qwen2-MoE also on 4.x): moeops as an
experts implementation, and a patch that also routes with moeops' fused gating.

* ``register()`` adds ``"moeops"`` to ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` so
  ``from_pretrained(..., experts_implementation="moeops")`` and
  ``config._experts_implementation = "moeops"`` run the experts with :func:`moeops.fused_experts`.
* ``patch(model)`` does that for every MoE block of a loaded model *and* replaces each router's
  forward with :func:`moeops.topk_gating`; ``unpatch(model)`` undoes it. Nothing is copied: the
  experts use the model's own ``gate_up_proj``/``down_proj`` parameters, state_dict keys and
  ``save_pretrained`` output are unchanged, and the router still returns
  ``(router_logits, weights, ids)`` so ``output_router_logits`` and the load-balancing loss work.
* ``patch_model_type("mixtral")`` patches the classes, for models built later.

Which model types are patched, and how, comes from :data:`moeops.models.FAMILIES`
(:data:`SUPPORTED` and :data:`SUPPORTED_V4` are read-only views of it). The public helpers below
(:func:`model_classes`, :func:`gating_params`, :func:`experts_operands`, :class:`PatchedForward`,
...) are what :mod:`moeops.interventions` and :mod:`moeops.distributed` build on; this module
imports neither of them (the patched forwards only look up a module's ``_moeops_iv``
attribute, set by :mod:`moeops.interventions`).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F

from moeops.models import FAMILIES, Family
from moeops.ops import fused_experts, fused_experts_list, topk_gating

IMPLEMENTATION = "moeops"

#: model_type -> (module path, router class, experts class): the types :func:`patch` takes on
#: transformers 5.x (a view of :data:`moeops.models.FAMILIES` entries with ``patch``)
SUPPORTED = MappingProxyType({t: (f.module, f.router, f.experts)
                              for t, f in FAMILIES.items() if f.patch})

#: model_type -> (module path, sparse MoE block class, per-expert (gate, up, down) linear names):
#: the types :func:`patch` takes on transformers 4.x (``patch_v4`` entries of ``FAMILIES``)
SUPPORTED_V4 = MappingProxyType({t: (f.module, f.sparse_block, f.expert_weights)
                                 for t, f in FAMILIES.items() if f.patch_v4})

# transformers' hidden_act names -> moeops activations
_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "relu": "relu", "relu2": "relu2"}


def transformers_major() -> int:
    """The installed transformers' major version (imports transformers)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def unsupported(what: str) -> ValueError:
    """The ValueError moeops raises for a model it cannot patch: ``what``, then the supported
    model types (transformers 5.x)."""
    return ValueError(f"moeops: {what}; supported model types: {', '.join(sorted(SUPPORTED))} "
                      "(transformers 5.x)")


def _family(model_type: str) -> Family:
    fam = FAMILIES.get(model_type)
    if fam is None or not fam.patch:
        raise unsupported(f"model type {model_type!r} is not supported")
    return fam


def model_classes(model_type: str) -> tuple[type, type]:
    """``(router class, experts class)`` of a transformers 5.x model type :func:`patch` takes;
    ValueError (:func:`unsupported`) for any other type."""
    fam = _family(model_type)
    return fam.cls(fam.router), fam.cls(fam.experts)


def activation_of(module) -> str:
    """The moeops activation name of a transformers 5.x experts module (from its config's
    ``hidden_act``); ValueError for an activation moeops has no kernel for."""
    act = getattr(getattr(module, "config", None), "hidden_act", None)
    if act not in _ACTIVATIONS:
        raise unsupported(f"experts activation {act!r} has no moeops kernel")
    return _ACTIVATIONS[act]


# ----------------------------------------------------------------------------- experts

def experts_operands(experts, top_k_index: torch.Tensor, num_experts: int):
    """What moeops needs from a transformers 5.x experts module: ``(ids, gated, w_up, b_up,
    b_down)`` with int32 ids (outside ``[0, num_experts)`` -> -1, as HF's own padding id),
    ``gated``, the up weight and the biases (None without). Raises for layouts moeops does not
    take."""
    if getattr(experts, "is_transposed", False) or not getattr(experts, "is_concatenated", True):
        raise unsupported("transposed or interleaved expert weights are not supported yet")
    ids = top_k_index.to(torch.int32)
    ids = torch.where((ids >= 0) & (ids < num_experts), ids, -1)
    gated = getattr(experts, "has_gate", True)
    w_up = experts.gate_up_proj if gated else experts.up_proj
    b_up = b_down = None
    if getattr(experts, "has_bias", False):
        b_up = getattr(experts, "gate_up_proj_bias" if gated else "up_proj_bias")
        b_down = experts.down_proj_bias
    return ids, gated, w_up, b_up, b_down


def experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """``ALL_EXPERTS_FUNCTIONS["moeops"]``: the experts module's forward on moeops' fused op.

    Same contract as transformers' experts implementations: ``hidden [T, H]``, ``top_k_index
    [T, K]`` (ids outside ``[0, E)`` are empty slots, as HF's own ``num_experts`` padding id),
    ``top_k_weights [T, K]`` -> ``[T, H]`` in ``hidden_states.dtype``. Differentiable.
    """
    ids, gated, w_up, b_up, b_down = experts_operands(self, top_k_index, self.down_proj.shape[0])
    iv = getattr(self, "_moeops_iv", None)  # moeops.interventions: None unless switched on
    if iv is not None:
        return iv.run_experts(self, hidden_states, ids, top_k_weights.float(), w_up,
                              self.down_proj, b_up, b_down, activation_of(self), gated)
    return fused_experts(hidden_states, ids, top_k_weights.float(), w_up, self.down_proj, b_up,
                         b_down, activation=activation_of(self), gated=gated)


def register() -> None:
    """Register ``"moeops"`` in transformers' experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)


# ----------------------------------------------------------------------------- routers

def gating_params(router) -> tuple[dict, bool]:
    """How moeops reproduces a router: ``(kwargs, cast)``, with ``kwargs`` the keyword arguments
    of :func:`moeops.topk_gating` after ``(logits, top_k)`` (``scoring``, ``renormalize``,
    ``routed_scaling_factor``, ``bias``, ``n_group``, ``topk_group``) and ``cast`` whether the
    router returns its weights in the logits dtype (the Qwen / OLMoE routers) rather than fp32
    (Mixtral, DeepSeek-V3).

    ``router``: a transformers 5.x router (DeepSeek-V3's, told by its
    ``e_score_correction_bias``: sigmoid scores, selection-only bias, group-limited top-k,
    scaling; the others: softmax top-k, renormalised unless ``norm_topk_prob`` is False), or a
    4.x sparse MoE block (it routes itself; ``cast`` is False since the block casts the weights
    to the hidden dtype itself). The patched router forwards and :mod:`moeops.interventions`
    both route with these arguments.
    """
    if hasattr(router, "e_score_correction_bias"):
        return _sigmoid_gating(router)
    return _softmax_gating(router, isinstance(getattr(router, "experts", None),
                                              torch.nn.ModuleList))


# The two halves of gating_params; the patched forwards, which know their router's kind, call
# them directly (a missing attribute of a torch module costs a microsecond to look up).

_MISSING = object()


def _softmax_gating(router, v4_block: bool = False) -> tuple[dict, bool]:
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE routers (and the 4.x sparse blocks)."""
    norm = getattr(router, "norm_topk_prob", _MISSING)  # Mixtral has none: always renormalises
    has_norm = norm is not _MISSING
    return (dict(scoring="softmax", renormalize=bool(norm) if has_norm else True,
                 routed_scaling_factor=1.0, bias=None, n_group=1, topk_group=1),
            has_norm and not v4_block)  # the Qwen/OLMoE routers return logits-dtype weights


def _sigmoid_gating(router) -> tuple[dict, bool]:
    """DeepSeek-V3 router."""
    return dict(scoring="sigmoid", renormalize=bool(router.norm_topk_prob),
                routed_scaling_factor=float(router.routed_scaling_factor),
                bias=router.e_score_correction_bias, n_group=int(router.num_group),
                topk_group=int(router.topk_group)), False


def _route(self, hidden_states, router_logits, gating):
    iv = getattr(self, "_moeops_iv", None)  # moeops.interventions: None unless switched on
    if iv is not None:
        return iv.route(self, hidden_states, router_logits)
    kwargs, cast = gating(self)
    w, ids, _, _ = topk_gating(router_logits, self.top_k, **kwargs)
    if cast:
        w = w.to(router_logits.dtype)
    return router_logits, w, ids.long()


def _softmax_router_forward(self, hidden_states):
    """Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE router on moeops gating (same outputs as HF)."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    return _route(self, hidden_states, F.linear(hidden_states, self.weight), _softmax_gating)


def _deepseek_v3_router_forward(self, hidden_states):
    """DeepSeek-V3 router: fp32 logits; sigmoid, selection-only bias, group-limited top-k,
    scaling."""
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    return _route(self, hidden_states, router_logits, _sigmoid_gating)


def _qwen2_moe_block_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen2-MoE sparse block (transformers 5.x) with its sigmoid-gated shared expert fused into
    moeops' combine: one fp32 sum of the routed experts and the shared expert, one rounding."""
    batch, seq, hidden_dim = hidden_states.shape
    x = hidden_states.view(-1, hidden_dim)
    shared = self.shared_expert(x)
    gate = torch.sigmoid(self.shared_expert_gate(x))
    _, weights, ids = self.gate(x)
    experts = self.experts
    E = experts.down_proj.shape[0]
    ids = ids.to(torch.int32)
    ids = torch.where((ids >= 0) & (ids < E), ids, -1)
    iv = getattr(experts, "_moeops_iv", None)  # moeops.interventions: None unless switched on
    if iv is not None:
        out = iv.run_experts(experts, x, ids, weights.float(), experts.gate_up_proj,
                             experts.down_proj, None, None, activation_of(experts), True,
                             shared_out=shared, shared_gate=gate)
        return out.reshape(batch, seq, hidden_dim)
    out = fused_experts(x, ids, weights.float(), experts.gate_up_proj, experts.down_proj,
                        activation=activation_of(experts), shared_out=shared, shared_gate=gate)
    return out.reshape(batch, seq, hidden_dim)


def block_forward(model_type: str) -> tuple[str, Callable] | None:
    """``(sparse block class name, patched forward)`` when :func:`patch` also patches the
    sparse MoE block of ``model_type`` on transformers 5.x (``fused_shared_expert`` families:
    the shared expert is fused into the experts' combine), else None."""
    fam = FAMILIES.get(model_type)
    if fam is None or not fam.fused_shared_expert:
        return None
    return fam.sparse_block, _qwen2_moe_block_forward


def _router_forward_for(model_type: str):
    return _deepseek_v3_router_forward if FAMILIES[model_type].sigmoid_router \
        else _softmax_router_forward


# ----------------------------------------------------------------------------- transformers 4.x
# 4.x keeps experts as a ModuleList of per-expert MLPs and routes inside the sparse MoE block.
# The patched block forward routes with topk_gating and runs fused_experts_list over the experts'
# own weight tensors: nothing is stacked or copied, so memory does not grow.

_V4_WEIGHT_NAMES = {f.sparse_block: f.expert_weights for f in FAMILIES.values() if f.patch_v4}

_ACT_MODULES = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu",
                "NewGELUActivation": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                "GELUTanh": "gelu_tanh", "ReLU": "relu", "ReLUSquaredActivation": "relu2"}


def v4_weight_names(block) -> tuple[str, str, str]:
    """The per-expert (gate, up, down) linear names of a transformers 4.x sparse MoE block's
    ModuleList experts (``("w1", "w3", "w2")`` for Mixtral)."""
    return _V4_WEIGHT_NAMES[type(block).__name__]


def v4_activation(expert) -> str:
    """The moeops activation name of one transformers 4.x expert MLP (from its ``act_fn``
    module); ValueError for an activation moeops has no kernel for."""
    name = type(expert.act_fn).__name__
    if name not in _ACT_MODULES:
        raise unsupported(f"experts activation {name} has no moeops kernel")
    return _ACT_MODULES[name]


def _v4_block_forward(self, hidden_states: torch.Tensor):
    """transformers 4.x Mixtral / Qwen2-MoE sparse MoE block on moeops (same outputs as HF)."""
    batch, seq, hidden_dim = hidden_states.shape
    if self.training and getattr(self, "jitter_noise", 0) > 0:
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
            1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
    iv = getattr(self, "_moeops_iv", None)  # moeops.interventions: None unless switched on
    if iv is not None:
        return iv.v4_block_forward(self, hidden_states)
    x = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(x)
    kwargs, _ = _softmax_gating(self, v4_block=True)
    w, ids, _, _ = topk_gating(router_logits, self.top_k, **kwargs)
    w = w.to(x.dtype).float()  # HF casts the routing weights to the hidden dtype
    g, u, d = v4_weight_names(self)
    shared = gate = None
    if hasattr(self, "shared_expert"):  # Qwen2-MoE: sigmoid-gated shared expert, fused in combine
        shared, gate = self.shared_expert(x), torch.sigmoid(self.shared_expert_gate(x))
    out = fused_experts_list(x, ids, w, [getattr(e, g).weight for e in self.experts],
                             [getattr(e, u).weight for e in self.experts],
                             [getattr(e, d).weight for e in self.experts],
                             activation=v4_activation(self.experts[0]), shared_out=shared,
                             shared_gate=gate)
    return out.reshape(batch, seq, hidden_dim), router_logits


def v4_block_class(model_type: str) -> type:
    """The transformers 4.x sparse MoE block class of ``model_type``; ValueError for a type
    :func:`patch` does not take on 4.x."""
    fam = FAMILIES.get(model_type)
    if fam is None or not fam.patch_v4:
        raise ValueError(f"moeops: model type {model_type!r} is not supported with transformers "
                         f"4.x; supported there: {', '.join(sorted(SUPPORTED_V4))}")
    return fam.cls(fam.sparse_block)


def _patch_v4(model, model_type: str):
    block_cls = v4_block_class(model_type)
    found = 0
    for module in model.modules():
        if isinstance(module, block_cls):
            if not is_patched_forward(module):
                module.forward = PatchedForward(module, _v4_block_forward)
            found += 1
    if found == 0:
        raise ValueError(f"moeops.patch: no {model_type} sparse MoE block in this model")
    model._moeops_patched = True
    return model


# ----------------------------------------------------------------------------- patching

class PatchedForward:
    """A patched ``forward`` bound to one module: ``PatchedForward(module, fn)(*args)`` calls
    ``fn(module, *args)``. A plain picklable object (a bound method of a function that is not the
    module's attribute cannot be unpickled), so ``torch.save`` / ``torch.load`` and
    ``copy.deepcopy`` of a patched model work."""

    def __init__(self, module: torch.nn.Module, fn):
        self.module = module
        self.fn = fn

    def __call__(self, *args, **kwargs):
        return self.fn(self.module, *args, **kwargs)

    def __setstate__(self, state):
        self.__dict__.update(state)
        if transformers_major() >= 5:  # the config still names the "moeops" implementation
            register()


_PatchedForward = PatchedForward  # the name models pickled by earlier versions refer to


def is_patched_forward(module: torch.nn.Module) -> bool:
    """True if ``module``'s forward is a :class:`PatchedForward` set on the instance."""
    return isinstance(module.__dict__.get("forward"), PatchedForward)


def patch(model: torch.nn.Module) -> torch.nn.Module:
    """Run every MoE block of ``model`` on moeops: routers on the fused gating op, experts on
    the fused experts op. In place, idempotent, no weight copies; returns ``model``."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if transformers_major() < 5:
        return _patch_v4(model, model_type)
    router_cls, experts_cls = model_classes(model_type)
    register()
    forward = _router_forward_for(model_type)
    block = block_forward(model_type)
    found = 0
    for module in model.modules():
        if isinstance(module, router_cls):
            if not is_patched_forward(module):
                module.forward = PatchedForward(module, forward)
            found += 1
        elif block is not None and type(module).__name__ == block[0]:
            if not is_patched_forward(module):
                module.forward = PatchedForward(module, block[1])
        elif isinstance(module, experts_cls):
            cfg = module.config
            if getattr(cfg, "_experts_implementation", None) != IMPLEMENTATION:
                module._moeops_prev_impl = getattr(cfg, "_experts_implementation", None)
                cfg._experts_implementation = IMPLEMENTATION
            found += 1
    if found == 0:
        raise ValueError(f"moeops.patch: no {model_type} MoE router or experts module in this "
                         "model")
    model._moeops_patched = True
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch` (in place); returns ``model``."""
    for module in model.modules():
        if is_patched_forward(module):
            del module.forward
        if hasattr(module, "_moeops_prev_impl"):
            module.config._experts_implementation = module._moeops_prev_impl
            del module._moeops_prev_impl
    model.__dict__.pop("_moeops_patched", None)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    """True if :func:`patch` was applied to ``model`` (and not undone)."""
    return bool(getattr(model, "_moeops_patched", False))


_class_patches: dict[str, tuple] = {}


def patch_model_type(model_type: str) -> None:
    """Patch the router and experts *classes* of ``model_type``: models built afterwards (and
    existing ones) route and run their experts on moeops. Undo with :func:`unpatch_model_type`."""
    if model_type in _class_patches:
        return
    if transformers_major() < 5:
        block_cls = v4_block_class(model_type)
        _class_patches[model_type] = (block_cls, block_cls.forward, None, None)
        block_cls.forward = _v4_block_forward
        return
    router_cls, experts_cls = model_classes(model_type)
    register()
    _class_patches[model_type] = (router_cls, router_cls.forward, experts_cls, experts_cls.forward)
    router_cls.forward = _router_forward_for(model_type)
    experts_cls.forward = experts_forward
    block = block_forward(model_type)
    if block is not None:
        block_cls = FAMILIES[model_type].cls(block[0])
        _class_patches[model_type + ":block"] = (block_cls, block_cls.forward, None, None)
        block_cls.forward = block[1]


def unpatch_model_type(model_type: str) -> None:
    """Restore the classes patched by :func:`patch_model_type`."""
    if model_type not in _class_patches:
        return
    if model_type + ":block" in _class_patches:
        block_cls, block_fwd, _, _ = _class_patches.pop(model_type + ":block")
        block_cls.forward = block_fwd
    router_cls, router_fwd, experts_cls, experts_fwd = _class_patches.pop(model_type)
    router_cls.forward = router_fwd
    if experts_cls is not None:
        experts_cls.forward = experts_fwd
