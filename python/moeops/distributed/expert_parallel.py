"""Expert parallelism proper (:mod:`moeops.distributed`, which re-exports the public names):
expert placement, the differentiable all-to-all exchange, :func:`ep_fused_experts`, sharding of
stacked expert tensors and state dicts, the :class:`ExpertParallelMoE` layer, and sharding a
patched Hugging Face transformers model (:func:`patch_expert_parallel`). The steps of one
layer's forward are in the package docstring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeops._timing import Laps
from moeops.integrations import hf
from moeops.ops import combine, fused_experts, topk_gating

#: the phases timed by ``ep_fused_experts(..., timings=...)`` (``wait`` only with
#: ``sync_phases=True``)
PHASES = ("dispatch", "experts", "combine", "wait")


# ----------------------------------------------------------------------------- placement

@dataclass(frozen=True)
class ExpertPlacement:
    """Which rank owns which expert.

    ``expert_to_rank[e]`` is the rank (in the process group) holding expert ``e``. A rank's local
    experts are its global ids in ascending order; local index ``i`` is the ``i``-th of them.
    A rank may own no expert (it still sends its tokens and takes part in every exchange).
    """

    expert_to_rank: tuple[int, ...]
    world_size: int

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"moeops: world_size must be >= 1, got {self.world_size}")
        if len(self.expert_to_rank) < 1:
            raise ValueError("moeops: expert_to_rank must name at least one expert")
        bad = [(e, r) for e, r in enumerate(self.expert_to_rank)
               if not isinstance(r, int) or not 0 <= r < self.world_size]
        if bad:
            raise ValueError(f"moeops: expert_to_rank must hold ranks in [0, {self.world_size}); "
                             f"got (expert, rank) {bad[:4]}")

    @classmethod
    def contiguous(cls, num_experts: int, world_size: int) -> ExpertPlacement:
        """Contiguous blocks: rank ``r`` owns experts ``[start_r, start_r + n_r)`` where the first
        ``num_experts % world_size`` ranks own one expert more (uneven when W does not divide E)."""
        if num_experts < 1:
            raise ValueError(f"moeops: num_experts must be >= 1, got {num_experts}")
        if world_size < 1:
            raise ValueError(f"moeops: world_size must be >= 1, got {world_size}")
        base, extra = divmod(num_experts, world_size)
        owner = []
        for r in range(world_size):
            owner += [r] * (base + (1 if r < extra else 0))
        return cls(tuple(owner), world_size)

    @classmethod
    def make(cls, num_experts: int, world_size: int,
             expert_to_rank: Sequence[int] | torch.Tensor | ExpertPlacement | None = None
             ) -> ExpertPlacement:
        """:meth:`contiguous` when ``expert_to_rank`` is None, else the given map (a sequence or
        tensor of ``num_experts`` ranks, or a placement), validated against E and W."""
        if expert_to_rank is None:
            return cls.contiguous(num_experts, world_size)
        if isinstance(expert_to_rank, ExpertPlacement):
            p = expert_to_rank
        else:
            if isinstance(expert_to_rank, torch.Tensor):
                expert_to_rank = expert_to_rank.tolist()
            p = cls(tuple(int(r) for r in expert_to_rank), world_size)
        if p.num_experts != num_experts or p.world_size != world_size:
            raise ValueError(f"moeops: expert_to_rank covers {p.num_experts} experts on "
                             f"{p.world_size} ranks; the layer has {num_experts} experts and the "
                             f"group {world_size} ranks")
        return p

    @property
    def num_experts(self) -> int:
        return len(self.expert_to_rank)

    def local_experts(self, rank: int) -> list[int]:
        """Global ids of the experts ``rank`` owns, ascending."""
        return [e for e, r in enumerate(self.expert_to_rank) if r == rank]

    def experts_per_rank(self) -> list[int]:
        return [sum(1 for r in self.expert_to_rank if r == q) for q in range(self.world_size)]

    def lookup_tables(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """int64 ``[E]`` tensors: the rank owning each expert, and its index among that rank's
        local experts."""
        owner = torch.tensor(self.expert_to_rank, dtype=torch.int64)
        local = torch.empty(self.num_experts, dtype=torch.int64)
        for r in range(self.world_size):
            mine = torch.tensor(self.local_experts(r), dtype=torch.int64)
            local[mine] = torch.arange(mine.numel(), dtype=torch.int64)
        return (owner.to(device), local.to(device)) if device is not None else (owner, local)


def group_info(group) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group`` (None: the default group, which must
    be initialised)."""
    if group is None:
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("moeops: ep_group is None and torch.distributed is not initialised; "
                             "call torch.distributed.init_process_group first or pass a group")
        group = dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------- exchange

class _AllToAll(torch.autograd.Function):
    """Differentiable uneven ``all_to_all_single`` of rows: the backward is the same exchange
    with send and receive splits swapped. ``anchor`` (a leaf that requires grad) makes the output
    require grad under grad mode on every rank, so every rank runs the backward exchange."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, anchor):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        gx = grad.new_empty((sum(ctx.send_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(gx, grad.contiguous(), ctx.send_splits, ctx.recv_splits,
                               group=ctx.group)
        return gx, None, None, None, None


def _exchange(x, send_splits, recv_splits, group, anchor):
    if anchor is None:
        with torch.no_grad():
            return _AllToAll.apply(x, send_splits, recv_splits, group, None)
    return _AllToAll.apply(x, send_splits, recv_splits, group, anchor)


# ----------------------------------------------------------------------------- the op

def ep_fused_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     w_up: torch.Tensor, w_down: torch.Tensor, placement: ExpertPlacement,
                     group=None, b_up: torch.Tensor | None = None,
                     b_down: torch.Tensor | None = None, *, activation: str = "silu",
                     gated: bool = True, gain: torch.Tensor | None = None,
                     combine_dtype: torch.dtype | None = None,
                     timings: dict | None = None, sync_phases: bool = False) -> torch.Tensor:
    """:func:`moeops.fused_experts` with the experts sharded over the ranks of ``group``.

    Called on every rank of ``group`` (collective; ``None`` = the default group) with that
    rank's tokens: ``hidden [T, H]`` (T may be 0), global ``ids [T, K]`` int32 (-1 = empty slot,
    never sent), ``weights [T, K]`` f32, and the rank's *local* expert weights in
    ``placement.local_experts(rank)`` order: ``w_up [n_local, N_up, H]``, ``w_down
    [n_local, H, I]``, optional ``b_up [n_local, N_up]``, ``b_down [n_local, H]``, ``gain
    [n_local]``. ``activation``/``gated`` as in :func:`moeops.fused_experts`.

    A token is sent once to each rank holding any of its experts (not once per slot); that rank
    computes the weighted sum over its slots (fp32, slot order) and sends it back in
    ``combine_dtype`` (default ``hidden.dtype``; ``torch.float32`` keeps it unrounded, so the
    result equals the single-process ``fused_experts`` up to fp32 rounding for any activation
    dtype, at twice the return bytes for bf16); the token's rank adds the partial sums in rank
    order, in fp32. Returns ``[T, H]`` in ``hidden.dtype``; differentiable with respect to
    hidden, weights and the local expert tensors. ``timings`` (a dict), if given, accumulates
    seconds per phase: ``dispatch`` (plan, the exchanges out), ``experts``, ``combine``
    (exchange back and sum), and counts ``rows_sent`` / ``rows_received`` (rows of ``H``
    values each way: one per (token, destination rank); tokens without slots send nothing).
    ``sync_phases`` (benchmarks only) adds a barrier before each row exchange, timed as
    ``wait``, so time spent waiting for slower ranks is not counted as exchange time.
    """
    rank, world = group_info(group)
    if placement.world_size != world:
        raise ValueError(f"moeops: placement is for {placement.world_size} ranks, the group has "
                         f"{world}")
    if hidden.dim() != 2:
        raise ValueError(f"moeops: hidden must be [T, H], got {tuple(hidden.shape)}")
    if ids.dim() != 2 or ids.shape[0] != hidden.shape[0] or weights.shape != ids.shape:
        raise ValueError(f"moeops: ids and weights must be [T, K] with T={hidden.shape[0]}, got "
                         f"ids {tuple(ids.shape)}, weights {tuple(weights.shape)}")
    n_per_rank = placement.experts_per_rank()
    n_local = n_per_rank[rank]
    if w_up.dim() != 3 or w_up.shape[0] != n_local or w_down.dim() != 3 or \
            w_down.shape[0] != n_local:
        raise ValueError(f"moeops: rank {rank} owns {n_local} experts, so w_up/w_down must be "
                         f"[{n_local}, ., .]; got w_up {tuple(w_up.shape)}, w_down "
                         f"{tuple(w_down.shape)}")
    E, T = placement.num_experts, ids.shape[0]
    out_dtype = combine_dtype or hidden.dtype
    dev = hidden.device
    timer = Laps(timings, dev)
    # Every rank must agree on whether the exchanges are recorded for backward; grad mode is the
    # one thing all ranks share, so under grad mode they always are (see the module docstring).
    anchor = torch.zeros((), requires_grad=True) if torch.is_grad_enabled() else None

    # 1. dispatch plan: one row per (token, destination rank) that holds any of the token's
    #    experts, ordered by (rank, token); the row carries the token's K slots with the ids of
    #    experts on that rank (as local indices) and -1 elsewhere
    ids = ids.to(torch.int32)
    if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= E):
        raise ValueError(f"moeops: ids must be in [-1, {E}), got [{int(ids.min())}, "
                         f"{int(ids.max())}]")
    owner, local_index = placement.lookup_tables(dev)
    valid = ids >= 0
    safe = ids.long().clamp(min=0)
    slot_rank = torch.where(valid, owner[safe], -1)  # [T, K]
    present = (slot_rank.unsqueeze(2) == torch.arange(world, device=dev)).any(1)  # [T, W]
    rank_of_row, token_of_row = present.t().nonzero(as_tuple=True)  # sorted by (rank, token)
    n_send = rank_of_row.numel()
    row_ids = torch.where(slot_rank[token_of_row] == rank_of_row.unsqueeze(1),
                          local_index[safe[token_of_row]], -1).to(torch.int32)  # [n_send, K]
    row_w = torch.where(row_ids >= 0, weights[token_of_row].float(), 0.0)
    rows = hidden[token_of_row]
    send_splits = [int(c) for c in present.sum(0).tolist()]
    if sync_phases:
        timer.lap("dispatch")
        dist.barrier(group=group)
        timer.lap("wait")
    # 2. counts: rank d learns how many rows each rank sends it (one small exchange)
    counts = torch.tensor(send_splits, dtype=torch.int64, device=dev)
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_splits = [int(c) for c in recv_counts.tolist()]
    # 3. rows out, with their slots' local ids and routing weights
    recv = _exchange(rows, send_splits, recv_splits, group, anchor)
    recv_w = _exchange(row_w, send_splits, recv_splits, group, anchor)
    with torch.no_grad():
        recv_ids = _exchange(row_ids, send_splits, recv_splits, group, None)
    timer.lap("dispatch")
    if timings is not None:
        timings["rows_sent"] = timings.get("rows_sent", 0) + n_send
        timings["rows_received"] = timings.get("rows_received", 0) + recv.shape[0]

    # 4. local experts: each received row is a token with its slots on this rank, so
    #    fused_experts also does this rank's share of the weighted sum (fp32, slot order)
    x = recv if recv.dtype == out_dtype else recv.to(out_dtype)
    if n_local > 0:
        y = fused_experts(x, recv_ids, recv_w, w_up, w_down, b_up, b_down,
                          activation=activation, gated=gated, gain=gain)
    else:  # no experts here, so nothing was received; keep the graph connected for backward
        y = x * 0 + recv_w.sum() * 0
    timer.lap("experts")

    # 5. partial sums back (reversed splits), 6. fp32 sum over ranks in rank order: row of
    #    (token t, rank r) is the position of (r, t) in the sorted send order, or -1
    if sync_phases:
        dist.barrier(group=group)
        timer.lap("wait")
    back = _exchange(y, recv_splits, send_splits, group, anchor)
    inverse = torch.full((T, world), -1, dtype=torch.int32, device=dev)
    inverse[token_of_row, rank_of_row] = torch.arange(n_send, dtype=torch.int32, device=dev)
    out = combine(back, torch.ones(T, world, device=dev), inverse.view(-1))
    timer.lap("combine")
    return out.to(hidden.dtype)


# ----------------------------------------------------------------------------- sharding

def _local_rows(t, name: str, placement: ExpertPlacement, rank: int) -> torch.Tensor:
    """The local experts' rows of a stacked expert tensor ``[E, ...]``, as a new contiguous
    tensor. ``t`` may be a tensor or a lazy safetensors slice (``safe_open(...).get_slice(name)``):
    then only the local rows are read (one read for a contiguous block, else one per expert)."""
    local = placement.local_experts(rank)
    shape = t.shape if isinstance(t, torch.Tensor) else t.get_shape()
    if len(shape) < 1 or shape[0] != placement.num_experts:
        raise ValueError(f"moeops: {name} must be stacked per expert [E={placement.num_experts}, "
                         f"...], got shape {tuple(shape)}")
    if not local:
        if isinstance(t, torch.Tensor):
            return t.new_empty((0,) + tuple(t.shape[1:]))
        return t[0:0]
    if local == list(range(local[0], local[-1] + 1)):
        part = t[local[0]:local[-1] + 1]
    elif isinstance(t, torch.Tensor):
        part = t.index_select(0, torch.tensor(local, device=t.device))
    else:
        part = torch.cat([t[e:e + 1] for e in local])
    if not isinstance(t, torch.Tensor):  # read from the file: already a new tensor
        return part.contiguous()
    return part.detach().clone(memory_format=torch.contiguous_format)


def shard_state_dict(state_dict, num_experts: int, *, rank: int, world_size: int,
                     expert_to_rank=None, keys: Sequence[str] | None = None) -> dict:
    """The part of a state dict one rank keeps: every stacked expert tensor (``[E, ...]``, named
    by ``keys``; by default every key containing ``"experts."`` whose first dimension is
    ``num_experts``) cut to the rank's local experts (new tensors), everything else as is.

    ``state_dict`` is a dict of tensors or an open safetensors file
    (``safetensors.safe_open(path, "pt")``); for a file, expert tensors are read through
    ``get_slice`` so only the local rows are read, and other tensors are read whole.
    """
    placement = ExpertPlacement.make(num_experts, world_size, expert_to_rank)
    lazy = hasattr(state_dict, "get_slice")
    out = {}
    for k in list(state_dict.keys()):
        if lazy:
            sl = state_dict.get_slice(k)
            stacked = (k in keys) if keys is not None else (
                "experts." in k and len(sl.get_shape()) >= 2
                and sl.get_shape()[0] == num_experts)
            out[k] = _local_rows(sl, k, placement, rank) if stacked else state_dict.get_tensor(k)
        else:
            t = state_dict[k]
            stacked = (k in keys) if keys is not None else (
                "experts." in k and t.dim() >= 2 and t.shape[0] == num_experts)
            out[k] = _local_rows(t, k, placement, rank) if stacked else t
    if keys is not None:
        missing = [k for k in keys if k not in out]
        if missing:
            raise KeyError(f"moeops: keys not in the state dict: {missing}")
    return out


# ----------------------------------------------------------------------------- the layer

class ExpertParallelMoE(torch.nn.Module):
    """An MoE layer (router + experts) whose experts are sharded over a process group.

    Holds the router weight ``[E, H]`` (replicated: each rank's gradient covers its own tokens;
    all-reduce it as for any data-parallel parameter) and only this rank's experts:
    ``w_up [n_local, N_up, H]``, ``w_down [n_local, H, I]`` (Hugging Face layout, see
    :func:`moeops.fused_experts`) and optional ``b_up``, ``b_down``, ``gain``. Build it with
    :meth:`from_full` or :meth:`from_state_dict`; ``forward(hidden [..., H])`` is collective.

    Gating options (``top_k``, ``scoring``, ``renormalize``, ``routed_scaling_factor``,
    ``gating_bias``, ``n_group``, ``topk_group``) are those of :func:`moeops.topk_gating`.
    """

    def __init__(self, router_weight: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                 top_k: int, *, placement: ExpertPlacement, group=None,
                 b_up: torch.Tensor | None = None, b_down: torch.Tensor | None = None,
                 gain: torch.Tensor | None = None, activation: str = "silu", gated: bool = True,
                 scoring: str = "softmax", renormalize: bool = False,
                 routed_scaling_factor: float = 1.0, gating_bias: torch.Tensor | None = None,
                 n_group: int = 1, topk_group: int = 1,
                 combine_dtype: torch.dtype | None = None):
        super().__init__()
        rank, world = group_info(group)
        if placement.world_size != world:
            raise ValueError(f"moeops: placement is for {placement.world_size} ranks, the group "
                             f"has {world}")
        if router_weight.dim() != 2 or router_weight.shape[0] != placement.num_experts:
            raise ValueError(f"moeops: router_weight must be [E={placement.num_experts}, H], got "
                             f"{tuple(router_weight.shape)}")
        self.group, self.placement, self.rank = group, placement, rank
        self.top_k = top_k
        self.local_experts = placement.local_experts(rank)
        self.router_weight = torch.nn.Parameter(router_weight)
        self.w_up = torch.nn.Parameter(w_up)
        self.w_down = torch.nn.Parameter(w_down)
        for name, t in (("b_up", b_up), ("b_down", b_down)):
            self.register_parameter(name, None if t is None else torch.nn.Parameter(t))
        self.register_buffer("gain", gain)  # fused_experts is not differentiable in the gain
        self.register_buffer("gating_bias", gating_bias)
        self.activation, self.gated, self.combine_dtype = activation, gated, combine_dtype
        self.gating = dict(scoring=scoring, renormalize=renormalize,
                           routed_scaling_factor=routed_scaling_factor, n_group=n_group,
                           topk_group=topk_group)

    @classmethod
    def from_full(cls, router_weight: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                  top_k: int, *, group=None, expert_to_rank=None, b_up=None, b_down=None,
                  gain=None, **kwargs) -> ExpertParallelMoE:
        """From the full (all-expert) tensors: keeps copies of this rank's rows only; the caller
        may drop the full tensors afterwards. ``expert_to_rank``: None (contiguous blocks), a
        sequence/tensor of E ranks, or an :class:`ExpertPlacement`."""
        rank, world = group_info(group)
        placement = ExpertPlacement.make(w_up.shape[0], world, expert_to_rank)

        def cut(t, name):
            return None if t is None else _local_rows(t, name, placement, rank)

        return cls(router_weight.detach().clone(), cut(w_up, "w_up"), cut(w_down, "w_down"),
                   top_k, placement=placement, group=group, b_up=cut(b_up, "b_up"),
                   b_down=cut(b_down, "b_down"), gain=cut(gain, "gain"), **kwargs)

    @classmethod
    def from_state_dict(cls, state_dict, top_k: int, *, prefix: str = "", group=None,
                        expert_to_rank=None, **kwargs) -> ExpertParallelMoE:
        """From a state dict with keys ``{prefix}router_weight``, ``{prefix}w_up``,
        ``{prefix}w_down`` (and optional ``b_up``, ``b_down``, ``gain``, ``gating_bias``) as
        written by this module's ``state_dict()`` on one process, or the same keys in an open
        safetensors file (``safe_open(path, "pt")``): then only this rank's expert rows are read.
        """
        rank, world = group_info(group)
        lazy = hasattr(state_dict, "get_slice")
        keys = set(state_dict.keys())

        def shape(k):
            return tuple(state_dict.get_slice(k).get_shape()) if lazy else \
                tuple(state_dict[k].shape)

        def whole(k):
            return state_dict.get_tensor(k) if lazy else state_dict[k]

        for k in ("router_weight", "w_up", "w_down"):
            if prefix + k not in keys:
                raise KeyError(f"moeops: {prefix + k!r} is not in the state dict")
        E = shape(prefix + "w_up")[0]
        placement = ExpertPlacement.make(E, world, expert_to_rank)
        parts = {}
        for k in ("w_up", "w_down", "b_up", "b_down", "gain"):
            if prefix + k in keys:
                src = state_dict.get_slice(prefix + k) if lazy else state_dict[prefix + k]
                parts[k] = _local_rows(src, prefix + k, placement, rank)
        if prefix + "gating_bias" in keys:
            kwargs.setdefault("gating_bias", whole(prefix + "gating_bias"))
        return cls(whole(prefix + "router_weight").clone(), parts.pop("w_up"),
                   parts.pop("w_down"), top_k, placement=placement, group=group, **parts,
                   **kwargs)

    def forward(self, hidden: torch.Tensor, *, mask: torch.Tensor | None = None,
                mask_mode: str = "reroute", forced: torch.Tensor | None = None,
                timings: dict | None = None, sync_phases: bool = False) -> torch.Tensor:
        """``hidden [..., H] -> [..., H]`` for this rank's tokens (collective over the group).
        ``mask``/``mask_mode``/``forced`` go to :func:`moeops.topk_gating` (masked or dropped
        slots send nothing). ``timings``, ``sync_phases``: see :func:`ep_fused_experts` (gating
        counts as ``dispatch``)."""
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        laps = Laps(timings)  # host clock, no device synchronisation (as the experts' phases)
        logits = torch.nn.functional.linear(x, self.router_weight.to(x.dtype))
        r = topk_gating(logits, self.top_k, bias=self.gating_bias, mask=mask,
                        mask_mode=mask_mode, forced=forced, **self.gating)
        laps.lap("dispatch")
        out = ep_fused_experts(x, r.ids, r.weights, self.w_up, self.w_down, self.placement,
                               self.group, self.b_up, self.b_down, activation=self.activation,
                               gated=self.gated, gain=self.gain,
                               combine_dtype=self.combine_dtype, timings=timings,
                               sync_phases=sync_phases)
        return out.reshape(shape)


# ----------------------------------------------------------------------------- Hugging Face

_EXPERT_TENSORS = ("gate_up_proj", "up_proj", "down_proj", "gate_up_proj_bias", "up_proj_bias",
                   "down_proj_bias")


def shard_experts_module(module: torch.nn.Module, placement: ExpertPlacement, rank: int) -> None:
    """Replace a transformers 5.x experts module's stacked expert parameters
    (``gate_up_proj``/``up_proj``, ``down_proj`` and their biases, ``[E, ...]``) by new
    parameters holding only ``rank``'s rows, in place. The full tensors are released once
    nothing else references them (create optimizers after sharding)."""
    for name in _EXPERT_TENSORS:
        p = module._parameters.get(name)
        if p is None:
            continue
        local = _local_rows(p.data, name, placement, rank)
        module._parameters[name] = torch.nn.Parameter(local, requires_grad=p.requires_grad)
        del p


def _ep_experts_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """A sharded transformers experts module's forward: same contract as
    :func:`moeops.integrations.hf.experts_forward`, experts on their owning ranks."""
    placement, group, combine_dtype = self._moeops_ep_shard
    ids, gated, w_up, b_up, b_down = hf.experts_operands(self, top_k_index,
                                                         placement.num_experts)
    timings = getattr(self, "_moeops_timings", None)
    return ep_fused_experts(hidden_states, ids, top_k_weights.float(), w_up, self.down_proj,
                            placement, group, b_up, b_down, activation=hf.activation_of(self),
                            gated=gated, combine_dtype=combine_dtype, timings=timings)


def patch_expert_parallel(model: torch.nn.Module, group=None, expert_to_rank=None, *,
                          combine_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``moeops.patch(model, ep_group=group, expert_to_rank=...)``: patch a transformers 5.x MoE
    model as :func:`moeops.patch` does, then shard every experts module over ``group`` (None =
    the default group): each rank keeps its experts' rows only and runs the experts through
    :func:`ep_fused_experts`. Call it on every rank with the same (loaded) model.

    ``expert_to_rank``: None (contiguous blocks, uneven when the group size does not divide E),
    or E ranks (a sequence, tensor or :class:`ExpertPlacement`), the same for every layer.
    In place, returns ``model``. The non-expert weights stay replicated. Not undoable (the
    other experts' weights are gone): :func:`moeops.unpatch` refuses a sharded model.
    """
    if hf.transformers_major() < 5:
        raise ValueError("moeops: expert parallelism (ep_group) needs transformers 5.x (stacked "
                         "expert tensors); this is transformers 4.x")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    rank, world = group_info(group)
    hf.patch(model)
    _, experts_cls = hf.model_classes(model_type)
    block = hf.block_forward(model_type)
    n = 0
    for module in model.modules():
        if block is not None and type(module).__name__ == block[0] and \
                hf.is_patched_forward(module):
            del module.forward  # its fused shared-expert path reads all experts; HF's calls ours
        elif isinstance(module, experts_cls) and not hasattr(module, "_moeops_ep_shard"):
            E = (module.gate_up_proj if getattr(module, "has_gate", True)
                 else module.up_proj).shape[0]
            placement = ExpertPlacement.make(E, world, expert_to_rank)
            shard_experts_module(module, placement, rank)
            module._moeops_ep_shard = (placement, group, combine_dtype)
            module.forward = hf.PatchedForward(module, _ep_experts_forward)
            n += 1
    if n == 0 and not any(hasattr(m, "_moeops_ep_shard") for m in model.modules()):
        raise ValueError(f"moeops.patch: no {model_type} experts module to shard in this model")
    model._moeops_ep = True
    return model


def is_expert_parallel(model: torch.nn.Module) -> bool:
    """True if :func:`patch_expert_parallel` sharded ``model``."""
    return bool(getattr(model, "_moeops_ep", False))
