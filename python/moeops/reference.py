"""Pure-torch oracle of every moeops op: the executable specification.

Every kernel (C++ CPU, CUDA, Triton) must agree with the functions here: ids, offsets and
counts exactly, floating-point outputs to rounding. Tests and benchmarks import this module;
nobody re-implements it. The functions take and return the same things as the
``torch.ops.moeops`` ops of the same name.

Routing conventions shared by all ops
-------------------------------------
* Expert ids are ``int32``; ``-1`` marks an *empty slot* (masked, dropped or not enough
  experts left). Empty slots carry weight 0 and cost nothing downstream.
* Routing weights are ``float32``.
* A *slot* is a (token, k) pair, flattened as ``s = t * K + k``.
"""

from __future__ import annotations

import torch

SCORINGS = ("softmax", "sigmoid")
MASK_MODES = ("reroute", "drop", "drop_renorm")
RENORM_EPS = 1e-20  # added to the denominator when renormalising (DeepSeek-V3 uses the same)


def _same_for_equal(fn, x: torch.Tensor) -> torch.Tensor:
    """``fn(x)`` elementwise such that equal inputs give bit-equal outputs. torch's CPU kernels
    compute the vectorised body and the scalar tail of a row differently, so equal logits can
    get scores 1 ulp apart depending on their position (seen: sigmoid of 33 equal values)."""
    y = fn(x)
    with torch.no_grad():
        u, inv = torch.unique(x.detach(), return_inverse=True)
        # .long(): torch 2.11's fake unique gives a non-integer inverse under torch.compile
        canonical = fn(u)[inv.long()]
    return y + (canonical - y).detach()  # canonical values, fn's gradient


def _stable_desc_order(key: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``key`` descending along the last dim; equal keys keep index order."""
    return torch.sort(key, dim=-1, descending=True, stable=True).indices


def _select_slots(sel: torch.Tensor, avail: torch.Tensor, forced_b: torch.Tensor, k: int):
    """Slot filling shared by topk_gating and moex_route: forced experts (whose ``sel`` is not
    NaN) first, then available experts by ``sel`` descending, ties to the lower index; slots
    past the available experts are empty. Returns ``(ids [T, k] int64 with -1, valid)``."""
    is_forced = forced_b & ~torch.isnan(sel)
    avail = avail | is_forced
    tier = is_forced.int() + avail.int()  # 2 forced, 1 available, 0 not selectable
    key = torch.where(avail, sel, torch.tensor(float("-inf"), device=sel.device))
    # sort by (tier desc, sel desc, index asc): stable sorts from the least significant key
    order = _stable_desc_order(key)
    order = order.gather(1, _stable_desc_order(tier.gather(1, order)))
    ids = order[:, :k]
    valid = avail.gather(1, ids)
    return torch.where(valid, ids, -1), valid


def _drop_masked(w: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, mask_b: torch.Tensor,
                 forced_b: torch.Tensor, mask_mode: str):
    """Mask modes ``drop`` / ``drop_renorm``: slots of masked, non-forced experts become empty;
    ``drop_renorm`` rescales the survivors to the token's weight sum before dropping."""
    hit = valid & mask_b.gather(1, ids.clamp(min=0)) & ~forced_b.gather(1, ids.clamp(min=0))
    before = w.sum(-1, keepdim=True)
    w = torch.where(hit, 0.0, w)
    ids = torch.where(hit, -1, ids)
    if mask_mode == "drop_renorm":
        after = w.sum(-1, keepdim=True)
        # w / after <= 1 first: before / after overflows for denormal survivors. A row with no
        # survivor divides by 1 instead of 0 (its branch is unused, but 0/0 would make the
        # gradient NaN through torch.where)
        w = torch.where(after > 0, w / torch.where(after > 0, after, 1.0) * before, w)
    return w, ids


def topk_gating(
    logits: torch.Tensor,
    k: int,
    scoring: str = "softmax",
    renormalize: bool = False,
    routed_scaling_factor: float = 1.0,
    bias: torch.Tensor | None = None,
    n_group: int = 1,
    topk_group: int = 1,
    mask: torch.Tensor | None = None,
    mask_mode: str = "reroute",
    forced: torch.Tensor | None = None,
    return_probs: bool = False,
    return_counts: bool = False,
):
    """Top-k gating from router logits ``[T, E]``.

    Returns ``(weights [T, k] f32, ids [T, k] i32, probs, counts)`` where ``probs`` is the
    ``[T, E]`` f32 score matrix if ``return_probs`` else an empty ``[0]`` tensor, and
    ``counts`` the ``[E]`` int32 number of non-empty slots per expert if ``return_counts``
    else an empty ``[0]`` tensor.

    Semantics, in order:

    1. ``scores = softmax(logits)`` or ``sigmoid(logits)``, computed in fp32.
    2. Selection key ``sel = scores + bias`` (``bias [E]`` only chooses; it never weighs:
       DeepSeek-V3's ``e_score_correction_bias``).
    3. An expert is *available* for a token unless its ``sel`` is NaN or (mode ``reroute``)
       it is masked. ``mask``/``forced`` are bool ``[E]`` or ``[T, E]``; True = masked/forced.
    4. Group-limited selection (``n_group > 1``, at least 2 experts per group): experts form
       ``n_group`` contiguous groups;
       a group's score is the sum of the two largest available ``sel`` in it (``-inf`` when
       fewer than two); the ``topk_group`` best groups are kept (ties: lower group index);
       experts of other groups become unavailable.
    5. Forced experts are always available (forcing wins over masking and group limits, but a
       NaN score is never selected) and rank before all others.
    6. Slots are filled in the order (forced first, then by ``sel`` descending, ties by lower
       expert index). Slots beyond the number of available experts are empty (id -1).
    7. ``weights = scores[ids]`` (0 for empty slots); if ``renormalize``:
       ``weights /= sum(weights) + 1e-20``; then ``weights *= routed_scaling_factor``.
    8. Mask modes ``drop`` and ``drop_renorm`` leave selection unchanged and afterwards empty
       the slots of masked (non-forced) experts; ``drop`` keeps the other weights as they are,
       ``drop_renorm`` rescales the survivors so their sum equals the sum before dropping
       (``w / after * before``).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [T, E], got shape {tuple(logits.shape)}")
    T, E = logits.shape
    x = logits.float()
    if scoring == "softmax":
        # exp through _same_for_equal: equal logits must get bit-equal scores (ties by index)
        e = _same_for_equal(torch.exp, x - x.max(dim=-1, keepdim=True).values)
        scores = e / e.sum(dim=-1, keepdim=True)
    else:
        scores = _same_for_equal(torch.sigmoid, x)
    sel = scores + bias.float() if bias is not None else scores
    avail = ~torch.isnan(sel)
    neg_inf = torch.tensor(float("-inf"), device=x.device)
    mask_b = mask.bool().expand(T, E) if mask is not None else None
    forced_b = forced.bool().expand(T, E) if forced is not None else torch.zeros_like(avail)
    if mask_b is not None and mask_mode == "reroute":
        avail = avail & ~mask_b

    if n_group > 1:
        g = E // n_group
        sel_g = torch.where(avail, sel, neg_inf).view(T, n_group, g)
        gscore = torch.topk(sel_g, 2, dim=-1).values.sum(-1)  # g >= 2 (checked by the op)
        gscore = torch.where(torch.isnan(gscore), neg_inf, gscore)
        keep_groups = _stable_desc_order(gscore)[:, :topk_group]
        gkeep = torch.zeros(T, n_group, dtype=torch.bool, device=x.device)
        gkeep.scatter_(1, keep_groups, True)
        avail = avail & gkeep.repeat_interleave(g, dim=1)

    ids, valid = _select_slots(sel, avail, forced_b, k)
    w = torch.where(valid, scores.gather(1, ids.clamp(min=0)), 0.0)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + RENORM_EPS)
    w = w * routed_scaling_factor

    if mask_b is not None and mask_mode in ("drop", "drop_renorm"):
        w, ids = _drop_masked(w, ids, valid, mask_b, forced_b, mask_mode)

    ids = ids.to(torch.int32)
    probs = scores if return_probs else scores.new_empty(0)
    if return_counts:
        flat = ids[ids >= 0].long()
        counts = torch.bincount(flat, minlength=E).to(torch.int32)
    else:
        counts = torch.empty(0, dtype=torch.int32, device=x.device)
    return w.float(), ids, probs, counts


def route_plan(ids: torch.Tensor, num_experts: int):
    """Routing plan from ids ``[T, K]`` (int32, -1 = empty slot).

    Returns ``(offsets [E+1] i32, sorted_slots [T*K] i32, inverse [T*K] i32)``:

    * ``offsets[e] .. offsets[e+1]`` are the rows of expert ``e``; ``offsets[E]`` is the
      number of non-empty slots ``R``.
    * ``sorted_slots[r]`` is the slot ``t*K + k`` whose token lands in row ``r``; rows are
      grouped by expert and, within an expert, ordered by slot (stable: deterministic).
      Rows ``R ..`` are padding and hold -1.
    * ``inverse[s]`` is the row of slot ``s``, or -1 for an empty slot.
    """
    flat = ids.reshape(-1).long()
    n = flat.numel()
    key = torch.where(flat >= 0, flat, num_experts)  # empty slots sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(flat[flat >= 0], minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    nvalid = int(offsets[-1])
    sorted_slots = torch.where(torch.arange(n, device=ids.device) < nvalid, order, -1)
    inverse = torch.full((n,), -1, dtype=torch.int64, device=ids.device)
    inverse[order[:nvalid]] = torch.arange(nvalid, device=ids.device)
    return offsets.int(), sorted_slots.int(), inverse.int()


def permute(hidden: torch.Tensor, sorted_slots: torch.Tensor, top_k: int,
            slot_scale: torch.Tensor | None = None):
    """Gather token rows into expert-grouped rows: ``[T, H] -> [len(sorted_slots), H]``.

    Row ``r`` is ``hidden[sorted_slots[r] // top_k]`` (times ``slot_scale[sorted_slots[r]]``
    in fp32 when given); rows whose slot is -1 are zero. Output dtype = ``hidden.dtype``.
    """
    s = sorted_slots.long()
    tok = torch.where(s >= 0, s // top_k, 0)
    rows = hidden.index_select(0, tok).float() if hidden.shape[0] > 0 else \
        hidden.new_zeros(s.numel(), hidden.shape[1], dtype=torch.float32)
    if slot_scale is not None:
        rows = rows * slot_scale.float()[s.clamp(min=0)].unsqueeze(1)
    rows = torch.where((s >= 0).unsqueeze(1), rows, 0.0)
    return rows.to(hidden.dtype)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, inverse: torch.Tensor):
    """Weighted combine of expert-grouped rows back to tokens: ``[R, H] -> [T, H]``.

    ``out[t] = sum_k weights[t, k] * expert_out[inverse[t*K + k]]`` over non-empty slots,
    accumulated in fp32 in slot order ``k = 0 .. K-1`` (deterministic), then cast to
    ``expert_out.dtype``.
    """
    T, K = weights.shape
    H = expert_out.shape[1]
    inv = inverse.long().view(T, K)
    out = torch.zeros(T, H, dtype=torch.float32, device=expert_out.device)
    for k in range(K):  # slot order is part of the spec (fixed fp32 summation order)
        idx = inv[:, k]
        valid = idx >= 0
        rows = expert_out.index_select(0, idx.clamp(min=0)).float() if expert_out.shape[0] > 0 \
            else torch.zeros(T, H, device=expert_out.device)
        out = out + torch.where(valid.unsqueeze(1), weights[:, k:k + 1].float() * rows, 0.0)
    return out.to(expert_out.dtype)


# ----------------------------------------------------------------------------- experts

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "relu2")


def apply_activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The expert activations: silu, gelu (erf), gelu_tanh, relu, relu2 (relu squared)."""
    if name == "silu":
        return torch.nn.functional.silu(x)
    if name == "gelu":
        return torch.nn.functional.gelu(x)
    if name == "gelu_tanh":
        return torch.nn.functional.gelu(x, approximate="tanh")
    if name == "relu":
        return torch.relu(x)
    if name == "relu2":
        return torch.relu(x).square()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                 w_transposed: bool = False) -> torch.Tensor:
    """Per-expert matmul over expert-grouped rows: ``[R, K] -> [R, N]`` in ``x.dtype``.

    ``w`` is ``[E, N, K]`` (``out = x @ w[e].T``, the nn.Linear / Hugging Face layout) or, with
    ``w_transposed``, ``[E, K, N]`` (``out = x @ w[e]``). Rows ``offsets[e]:offsets[e+1]`` use
    expert ``e``; rows from ``offsets[E]`` on are zero. fp32 accumulation, one rounding.
    """
    E = w.shape[0]
    N = w.shape[2] if w_transposed else w.shape[1]
    out = torch.zeros(x.shape[0], N, dtype=torch.float32, device=x.device)
    off = offsets.tolist()
    for e in range(E):
        a, b = off[e], off[e + 1]
        if b > a:
            we = w[e].float()
            out[a:b] = x[a:b].float() @ (we if w_transposed else we.t())
    return out.to(x.dtype)


def _expert_mlp(x, e, w_up, w_down, b_up, b_down, activation, gated):
    """Expert ``e`` on fp32 rows ``x``: ``(h, y)`` with ``h = act(x W_up^T + b_up)`` (times the
    up half for gated experts) and ``y = h W_down^T + b_down``, all fp32."""
    u = x @ w_up[e].float().t()
    if b_up is not None:
        u = u + b_up[e].float()
    if gated:
        i = u.shape[1] // 2
        h = apply_activation(u[:, :i], activation) * u[:, i:]
    else:
        h = apply_activation(u, activation)
    y = h @ w_down[e].float().t()
    if b_down is not None:
        y = y + b_down[e].float()
    return h, y


def fused_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                  w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None = None,
                  b_down: torch.Tensor | None = None, activation: str = "silu",
                  gated: bool = True, gain: torch.Tensor | None = None,
                  shared_out: torch.Tensor | None = None,
                  shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """The expert computation of an MoE layer: ``[T, H] -> [T, H]`` in ``hidden.dtype``.

    For each non-empty slot (token ``t``, expert ``e = ids[t, k]``):

    * ``u = x_t @ w_up[e].T (+ b_up[e])`` with ``w_up [E, N_up, H]``;
    * gated (SwiGLU with ``silu``, GeGLU with ``gelu``): ``N_up = 2I``, the first ``I`` rows are
      the gate, the last ``I`` the up projection (Hugging Face's ``gate_up_proj``):
      ``h = act(u[:I]) * u[I:]``; not gated: ``N_up = I``, ``h = act(u)``;
    * ``y = h @ w_down[e].T (+ b_down[e])`` with ``w_down [E, H, I]``;
    * ``out[t] += weights[t, k] * gain[e] * y`` in fp32, slots in order ``k = 0..K-1``.

    * a shared expert's output ``shared_out [T, H]`` (e.g. Qwen2-MoE's), times ``shared_gate``
      (``[T]`` or ``[T, 1]``, 1 if absent), is added last, in the same fp32 sum.

    Everything is computed in fp32 (intermediates are not rounded); the output is rounded once.
    Empty slots (-1) and experts with ``gain == 0`` contribute nothing.
    """
    T, H = hidden.shape
    K = ids.shape[1]
    E = w_up.shape[0]
    x = hidden.float()
    g = gain.float() if gain is not None else torch.ones(E, device=hidden.device)
    ys = torch.zeros(T, K, H, dtype=torch.float32, device=hidden.device)
    idl = ids.long()
    for e in range(E):
        t_idx, k_idx = torch.nonzero(idl == e, as_tuple=True)
        if t_idx.numel() == 0 or float(g[e]) == 0.0:
            continue
        h, y = _expert_mlp(x[t_idx], e, w_up, w_down, b_up, b_down, activation, gated)
        ys = ys.index_put((t_idx, k_idx), y * (weights[t_idx, k_idx].float() * g[e]).unsqueeze(1))
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    for k in range(K):  # fixed slot order
        out = out + ys[:, k]
    if shared_out is not None:
        sg = shared_gate.float().reshape(T, 1) if shared_gate is not None else 1.0
        out = out + sg * shared_out.float()
    return out.to(hidden.dtype)


def fused_experts_list(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                       w_gate: list[torch.Tensor], w_up: list[torch.Tensor],
                       w_down: list[torch.Tensor], activation: str = "silu",
                       shared_out: torch.Tensor | None = None,
                       shared_gate: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fused_experts` (gated) with per-expert weight lists, transformers 4.x style:
    ``w_gate[e]``, ``w_up[e]`` ``[I, H]`` and ``w_down[e]`` ``[H, I]``."""
    gate_up = torch.cat([torch.stack(list(w_gate)), torch.stack(list(w_up))], dim=1)
    return fused_experts(hidden, ids, weights, gate_up, torch.stack(list(w_down)),
                         activation=activation, gated=True, shared_out=shared_out,
                         shared_gate=shared_gate)


def fused_experts_stats(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                        w_up: torch.Tensor, w_down: torch.Tensor, b_up: torch.Tensor | None = None,
                        b_down: torch.Tensor | None = None, activation: str = "silu",
                        gated: bool = True, gain: torch.Tensor | None = None,
                        shared_out: torch.Tensor | None = None,
                        shared_gate: torch.Tensor | None = None):
    """:func:`fused_experts` plus statistics of the expert outputs.

    Returns ``(out, slot_norms, out_absmax, out_absmax_channel, in_absmax, active_units)``:

    * ``out``: exactly :func:`fused_experts`;
    * ``slot_norms [T, K]`` f32: ``||y_{t,k}||_2`` of each slot's *unweighted* expert output
      ``y = h @ w_down[e].T (+ b_down[e])`` (before routing weight and gain); 0 for empty slots
      and for experts with gain 0 (they are not computed);
    * ``out_absmax [E]`` f32: ``max |y|`` over all rows and channels of expert ``e``;
      ``out_absmax_channel [E]`` int64: the channel of that maximum (first in slot order, then
      channel order), -1 for an expert without rows;
    * ``in_absmax [E]`` f32: ``max |h|`` of the down projection's input; ``active_units [E]``
      int64: number of non-zero entries of ``h`` summed over the expert's rows (for ReLU experts,
      the active units).
    """
    T, H = hidden.shape
    K = ids.shape[1]
    E = w_up.shape[0]
    dev = hidden.device
    out = fused_experts(hidden, ids, weights, w_up, w_down, b_up, b_down, activation, gated, gain,
                        shared_out, shared_gate)
    norms = torch.zeros(T, K, dtype=torch.float32, device=dev)
    out_max = torch.zeros(E, dtype=torch.float32, device=dev)
    channel = torch.full((E,), -1, dtype=torch.int64, device=dev)
    in_max = torch.zeros(E, dtype=torch.float32, device=dev)
    active = torch.zeros(E, dtype=torch.int64, device=dev)
    x = hidden.float()
    idl = ids.long()
    for e in range(E):
        t_idx, k_idx = torch.nonzero(idl == e, as_tuple=True)  # slot order (row-major)
        if t_idx.numel() == 0 or (gain is not None and float(gain[e]) == 0.0):
            continue
        h, y = _expert_mlp(x[t_idx], e, w_up, w_down, b_up, b_down, activation, gated)
        norms[t_idx, k_idx] = y.norm(dim=1)
        a = y.abs().reshape(-1)
        j = int(torch.argmax(a))
        out_max[e] = a[j]
        channel[e] = j % H
        in_max[e] = h.abs().max()
        active[e] = (h != 0).sum()
    return out, norms, out_max, channel, in_max, active


# ----------------------------------------------------------------------------- MoE-X
# Sparsity-aware routing and ReLU experts with a sparse down-projection (docs/moex.md).
# Expert j: h_j = ReLU(W_enc[j] x + b_enc[j]) (W_enc [M, D, d]), y_j = h_j @ W_dec[j] + b_dec[j]
# with the decoder stored as W_dec [M, D, d]: row i is unit i's contribution to the output, so
# an active unit is one contiguous row.

MOEX_SELECT = ("sparsest", "densest")
MOEX_DOWN_MODES = ("auto", "dense", "sparse")
_SQRT1_2 = 0.7071067811865476


def moex_router_stats(w_enc: torch.Tensor, b_enc: torch.Tensor | None = None):
    """Per-expert column statistics of the encoders ``w_enc [M, D, d]`` (and ``b_enc [M, D]``).

    Returns ``(mu [M, d], var [M, d], bias_mean [M])`` in fp32: the mean and the *population*
    variance (divide by D) over the D rows of each expert, and the mean encoder bias (zeros
    when ``b_enc`` is None). Differentiable.
    """
    w = w_enc.float()
    mu = w.mean(1)
    var = (w - mu.unsqueeze(1)).square().mean(1)
    if b_enc is not None:
        bmean = b_enc.float().mean(1)
    else:
        bmean = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device)
    return mu, var, bmean


def moex_density(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor,
                 bias_mean: torch.Tensor) -> torch.Tensor:
    """Predicted active fraction ``Phi(mu_h / sigma_h)`` of every expert for every token, [T, M].

    ``mu_h = x . mu_j + bias_mean_j``, ``sigma_h = sqrt((x*x) . var_j)``. When ``sigma_h == 0``
    (x = 0 or an expert whose rows are all equal) every unit's pre-activation is exactly
    ``mu_h``, and the density is the limit of Phi(mu_h / sigma) for sigma -> 0+: 1 if
    ``mu_h > 0``, 0 if ``mu_h < 0``, 1/2 if ``mu_h == 0`` (gradient 0 there).
    """
    xf = x.float()
    mu_h = xf @ mu.float().t() + bias_mean.float()
    s2 = (xf * xf) @ var.float().t()
    pos = s2 > 0
    sigma = torch.sqrt(torch.where(pos, s2, 1.0))  # no inf gradient at 0
    inf = torch.tensor(float("inf"), device=mu_h.device)
    limit = torch.where(mu_h > 0, inf, torch.where(mu_h < 0, -inf, 0.0))
    z = torch.where(pos, mu_h / sigma, limit)
    z = torch.where(torch.isnan(mu_h) | torch.isnan(s2), float("nan"), z)
    return 0.5 * torch.erfc(-z * _SQRT1_2)


def moex_route(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, bias_mean: torch.Tensor,
               k: int, select: str = "sparsest", mask: torch.Tensor | None = None,
               mask_mode: str = "reroute", forced: torch.Tensor | None = None,
               return_density: bool = False):
    """MoE-X sparsity-aware routing of ``x [T, d]``.

    Returns ``(weights [T, k] f32, ids [T, k] i32, density)`` with ``density`` the ``[T, M]``
    predicted active fractions (:func:`moex_density`) if ``return_density`` else ``[0]``.

    1. ``density = moex_density(x, mu, var, bias_mean)``; selection score ``s = -density``
       (``select="sparsest"``, the paper's rule) or ``+density`` (``"densest"``, ablation).
    2. Selection exactly as :func:`topk_gating` with ``sel = s``: an expert is available unless
       its score is NaN or (``reroute``) it is masked; forced experts (score not NaN) rank
       first; then ``s`` descending, ties to the lower expert index; missing experts give
       empty slots (-1).
    3. ``weights = softmax`` of ``s`` over the token's non-empty slots (0 for empty slots).
    4. ``drop`` / ``drop_renorm``: selection and softmax as if unmasked, then the slots of
       masked non-forced experts become empty; ``drop`` keeps the other weights,
       ``drop_renorm`` rescales the survivors to the sum before dropping (``w / after * before``).
    """
    if select not in MOEX_SELECT:
        raise ValueError(f"select must be one of {MOEX_SELECT}, got {select!r}")
    density = moex_density(x, mu, var, bias_mean)
    T, M = density.shape
    s = -density if select == "sparsest" else density
    neg_inf = torch.tensor(float("-inf"), device=s.device)
    avail = ~torch.isnan(s)
    mask_b = mask.bool().expand(T, M) if mask is not None else None
    forced_b = forced.bool().expand(T, M) if forced is not None else torch.zeros_like(avail)
    if mask_b is not None and mask_mode == "reroute":
        avail = avail & ~mask_b
    ids, valid = _select_slots(s, avail, forced_b, k)
    logit = torch.where(valid, s.gather(1, ids.clamp(min=0)), neg_inf)
    mx = torch.where(valid, logit, 0.0).max(-1, keepdim=True).values  # scores are in [-1, 1]
    e = torch.where(valid, torch.exp(logit - mx), 0.0)
    w = torch.where(valid, e / e.sum(-1, keepdim=True).clamp(min=1e-30), 0.0)
    if mask_b is not None and mask_mode in ("drop", "drop_renorm"):
        w, ids = _drop_masked(w, ids, valid, mask_b, forced_b, mask_mode)
    out_density = density if return_density else density.new_empty(0)
    return w.float(), ids.to(torch.int32), out_density


def moex_experts(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 w_enc: torch.Tensor, b_enc: torch.Tensor | None, w_dec: torch.Tensor,
                 b_dec: torch.Tensor | None = None, down: str = "auto",
                 return_active: bool = False):
    """MoE-X ReLU experts: ``hidden [T, d] -> (out [T, d], active)``.

    For each non-empty slot (token t, expert e = ids[t, k]): ``h = ReLU(x_t @ w_enc[e].T +
    b_enc[e])`` (``w_enc [M, D, d]``), ``y = h @ w_dec[e] + b_dec[e]`` (``w_dec [M, D, d]``:
    the decoder stored unit-major), ``out[t] += weights[t, k] * y`` in fp32 in slot order.
    ``active [T, K]`` int32 is the number of units with ``h != 0`` (active, or NaN) of each slot
    (0 for empty slots) if ``return_active`` else ``[0]``. ``down`` picks the kernel's
    down-projection path (``"auto"``, ``"dense"``, ``"sparse"``); every path computes the same
    numbers, so the reference ignores it. Output in ``hidden.dtype``, intermediates fp32.
    """
    if down not in MOEX_DOWN_MODES:
        raise ValueError(f"down must be one of {MOEX_DOWN_MODES}, got {down!r}")
    T, H = hidden.shape
    K = ids.shape[1]
    M = w_enc.shape[0]
    x = hidden.float()
    ys = torch.zeros(T, K, H, dtype=torch.float32, device=hidden.device)
    active = torch.zeros(T, K, dtype=torch.int32, device=hidden.device)
    idl = ids.long()
    for e in range(M):
        t_idx, k_idx = torch.nonzero(idl == e, as_tuple=True)
        if t_idx.numel() == 0:
            continue
        u = x[t_idx] @ w_enc[e].float().t()
        if b_enc is not None:
            u = u + b_enc[e].float()
        h = torch.relu(u)
        active[t_idx, k_idx] = (h != 0).sum(1).int()  # NaN counts
        y = h @ w_dec[e].float()
        if b_dec is not None:
            y = y + b_dec[e].float()
        ys = ys.index_put((t_idx, k_idx), y * weights[t_idx, k_idx].float().unsqueeze(1))
    out = torch.zeros(T, H, dtype=torch.float32, device=hidden.device)
    for k in range(K):
        out = out + ys[:, k]
    return out.to(hidden.dtype), active if return_active else active.new_empty(0)


def moex_wide_code_dense(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                         w_enc: torch.Tensor, b_enc: torch.Tensor | None) -> torch.Tensor:
    """The wide hidden code ``z [T, M*D]`` (fp32, dense): ``z[t, j*D + i] = omega_j h_{j,i}``
    with ``omega_j`` the summed weight of the token's slots routed to expert j (0 if none)."""
    T = hidden.shape[0]
    M, D, _ = w_enc.shape
    x = hidden.float()
    u = torch.einsum("td,mkd->tmk", x, w_enc.float())
    if b_enc is not None:
        u = u + b_enc.float().unsqueeze(0)
    h = torch.relu(u)  # [T, M, D]
    omega = torch.zeros(T, M, dtype=torch.float32, device=hidden.device)
    valid = ids >= 0
    omega.index_put_((torch.arange(T, device=hidden.device).unsqueeze(1).expand_as(ids)[valid],
                      ids.long()[valid]), weights.float()[valid], accumulate=True)
    return (omega.unsqueeze(-1) * h).reshape(T, M * D)


def moex_as_wide_mlp(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                     w_enc: torch.Tensor, b_enc: torch.Tensor | None, w_dec: torch.Tensor,
                     b_dec: torch.Tensor | None = None) -> torch.Tensor:
    """The MoE-X layer written as one wide MLP of width M*D (the paper's equivalence):
    ``y = z @ W_dec_wide + sum_j omega_j b_dec[j]`` with ``W_dec_wide = w_dec.reshape(M*D, d)``
    and ``z`` from :func:`moex_wide_code_dense`. fp32 result (equivalence oracle)."""
    M, D, d = w_dec.shape
    z = moex_wide_code_dense(hidden, ids, weights, w_enc, b_enc)
    y = z @ w_dec.float().reshape(M * D, d)
    if b_dec is not None:
        omega = torch.zeros(hidden.shape[0], M, dtype=torch.float32, device=hidden.device)
        valid = ids >= 0
        omega.index_put_((torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1)
                          .expand_as(ids)[valid], ids.long()[valid]), weights.float()[valid],
                         accumulate=True)
        y = y + omega @ b_dec.float()
    return y


def moex_code(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
              w_enc: torch.Tensor, b_enc: torch.Tensor | None = None):
    """Wide-code export: the non-zeros of ``z`` (:func:`moex_wide_code_dense`) per token, CSR.

    Returns ``(indptr [T+1] i64, indices [nnz] i64, values [nnz] f32, l0 [T] i32)``: token t's
    entries are ``indptr[t]:indptr[t+1]``, global unit indices ``j*D + i`` ascending, values
    ``omega_j * h_{j,i}`` (exactly the non-zeros of z), ``l0[t] = ||z_t||_0``.
    """
    z = moex_wide_code_dense(hidden, ids, weights, w_enc, b_enc)
    nz = z != 0
    l0 = nz.sum(1)
    indptr = torch.zeros(z.shape[0] + 1, dtype=torch.int64, device=z.device)
    indptr[1:] = torch.cumsum(l0, 0)
    t_idx, c_idx = torch.nonzero(nz, as_tuple=True)  # row-major: tokens, then index ascending
    return indptr, c_idx, z[t_idx, c_idx], l0.int()
