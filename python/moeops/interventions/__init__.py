"""Routing statistics and expert interventions on a model patched by :func:`moeops.patch`, and
the MoE research papers' workflows built on them (``docs/interventions.md``).

Everything is per MoE layer. A layer is off unless something was switched on for it: the patched
router and experts forwards look at one attribute (``module._moeops_iv``), find ``None`` and run
exactly the ops they run without this module (checked by counting dispatched ops in the tests).

* **Statistics** (:func:`enable_stats`, :func:`collect_stats`, :func:`read_stats`,
  :func:`reset_stats`), cumulative levels:

  - ``"counts"``: selected slots per expert (the gating kernel's ``return_counts`` output);
  - ``"weights"``: + sums of the selected routing weights per expert;
  - ``"probs"``: + sums of the full router probabilities per expert (softmax, or the sigmoid
    scores of DeepSeek-V3) and the number of tokens;
  - ``"outputs"``: + per expert the sum of the per-slot L2 norms of the *unweighted* expert
    output, ``max |down-projection output|`` with its channel, ``max |down-projection input|``
    and the number of non-zero down-projection inputs (active units of ReLU experts), all from
    :func:`moeops.fused_experts_stats` (computed inside the CPU or CUDA kernel after the down
    GEMM).

  Accumulators are tensors on the model's device, updated in place with ``index_add_`` /
  ``maximum`` / ``+=``: no host synchronisation. ``read_stats`` returns plain dicts of tensors.

* **Interventions** (:func:`set_intervention`, :func:`intervene`, :func:`clear_interventions`):
  expert masks (``reroute`` / ``drop`` / ``drop_renorm``, global ``[E]`` or per token ``[T, E]``,
  applied after scoring or, ``mask_stage="pre_score"``, before it), per-expert output ``gain``,
  forced experts (``[E]``/``[T, E]`` bool, or one id per token), rank-subset routing (ranks
  ``[r0, r1, ...]`` of the sorted experts; also one rank list per contiguous group of rows for
  two routings in one batched forward), top-p routing, and externally supplied routing
  (``(ids, weights)`` or a callable). Empty slots (id -1) cost nothing in ``fused_experts``.

Layers are named by their decoder-layer index (``model.model.layers[i]``); only MoE layers
exist here (DeepSeek-V3's leading dense layers do not). transformers 5.x models, and the 4.x
Mixtral / Qwen2-MoE integration (ModuleList experts; see
:meth:`moeops.interventions._state.LayerState.v4_block_forward`).

Submodules: :mod:`~moeops.interventions._state` (MoE layers, per-layer state, what the patched
forwards call), :mod:`~moeops.interventions.stats`, :mod:`~moeops.interventions.control`
(interventions), :mod:`~moeops.interventions.workflows` (the papers' workflows). Every public
name is importable from :mod:`moeops.interventions` itself.
"""

from moeops.interventions._state import (
    MASK_MODES,
    MASK_STAGES,
    STATS_LEVELS,
    MoeLayer,
    layer_indices,
    moe_layers,
)
from moeops.interventions.control import (
    clear_interventions,
    force_experts,
    intervene,
    prune_experts,
    set_intervention,
    switch_off,
)
from moeops.interventions.stats import (
    collect_stats,
    disable_stats,
    enable_stats,
    read_stats,
    reset_stats,
)
from moeops.interventions.workflows import (
    ActivationProfile,
    SelfContrastOutput,
    SuperExperts,
    contrast_scores,
    easy_ep_scores,
    expert_activation_profile,
    find_super_experts,
    keep_top_experts,
    router_probabilities,
    self_contrast_generate,
    self_contrast_logits,
)

__all__ = [
    "STATS_LEVELS", "MASK_MODES", "MASK_STAGES", "MoeLayer", "moe_layers", "layer_indices",
    "enable_stats", "disable_stats", "reset_stats", "read_stats", "collect_stats",
    "set_intervention", "clear_interventions", "intervene", "switch_off", "force_experts",
    "prune_experts",
    "ActivationProfile", "expert_activation_profile", "SuperExperts", "find_super_experts",
    "easy_ep_scores", "keep_top_experts", "SelfContrastOutput", "contrast_scores",
    "self_contrast_logits", "self_contrast_generate", "router_probabilities",
]
