"""Expert parallelism over ``torch.distributed``: experts sharded across the ranks of a process
group, tokens sent to the rank owning their expert and back with ``all_to_all_single``.

Each rank keeps the router (replicated) and only its own experts' weights. One MoE layer's
forward on every rank (design, data volumes and the NCCL mapping: ``docs/distributed.md``):

1. local gating: ``topk_gating`` on the rank's own tokens -> ids/weights ``[T, K]``;
2. dispatch: one row per (token, destination rank holding any of its experts), in (rank, token)
   order, carrying the token's K slots as local expert indices on that rank (-1 elsewhere) and
   their routing weights; a token whose slots are all empty sends nothing;
3. exchange the per-rank row counts (one small ``all_to_all_single``), then the rows, their
   slot ids and weights (uneven ``all_to_all_single`` calls);
4. local experts: ``fused_experts`` on the received rows with those ids and weights, which also
   does the rank's share of the token's weighted sum (fp32, slot order);
5. the partial sums go back with the reversed splits, in ``combine_dtype``;
6. combine: ``combine`` sums each token's partial sums over ranks in rank order, in fp32
   (deterministic).

The row and weight exchanges are an autograd function (backward = the same all-to-all with the
splits swapped), so gradients reach the inputs, the router and every rank's expert shard. Under grad
mode every rank records the exchanges, so if any rank runs backward, all must (as with DDP).

:func:`patch_expert_parallel` (``moeops.patch(model, ep_group=...)``) does this for a Hugging Face
transformers 5.x model: each experts module keeps only its local rows of the stacked expert
tensors and forwards through :func:`ep_fused_experts`.

Submodules: :mod:`moeops.distributed.expert_parallel` (placement, exchange, the op, sharding,
the layer, Hugging Face models) and :mod:`moeops.distributed.checkpoint` (loading a checkpoint
rank by rank); every public name is importable from :mod:`moeops.distributed` itself.
"""

from moeops.distributed.checkpoint import load_pretrained_expert_parallel
from moeops.distributed.expert_parallel import (  # noqa: F401  (is_expert_parallel: public)
    PHASES,
    ExpertParallelMoE,
    ExpertPlacement,
    ep_fused_experts,
    is_expert_parallel,
    patch_expert_parallel,
    shard_experts_module,
    shard_state_dict,
)

__all__ = [
    "ExpertPlacement", "ExpertParallelMoE", "ep_fused_experts", "patch_expert_parallel",
    "shard_experts_module", "shard_state_dict", "load_pretrained_expert_parallel", "PHASES",
]
