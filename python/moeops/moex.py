"""MoE-X layers: sparsity-aware routing over ReLU experts (Yang et al., "Mixture of Experts Made
Intrinsically Interpretable", ICML 2025), on the moeops MoE-X ops. See ``docs/moex.md``.

* :class:`MoEXLayer`: ``M`` ReLU experts ``E_j(x) = W_dec_j^T ReLU(W_enc_j x + b_enc_j) + b_dec_j``
  routed by the predicted-sparsity score ``-Phi(mu_h / sigma_h)`` computed from the encoders'
  column statistics (no router parameters). Trainable end to end: gradients reach ``w_enc``
  through the experts and through the router statistics.
* :meth:`MoEXLayer.from_dense_mlp`: upcycle a dense MLP (GPT-2 ``c_fc``/``c_proj`` Conv1D, a
  module with ``fc1``/``fc2``, or ``nn.Sequential(Linear, act, Linear)``) into M copies.
* :func:`upcycle_gpt2`: replace every GPT-2 block's MLP by an upcycled MoE-X layer, in place.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from moeops.ops import (
    MoexCode,
    MoexRouting,
    MoexStats,
    moex_code,
    moex_experts,
    moex_route,
    moex_router_stats,
)

__all__ = ["MoEXLayer", "MoexRecord", "upcycle_gpt2", "expert_l0"]


class MoexRecord(NamedTuple):
    """What a :class:`MoEXLayer` with ``record=True`` keeps from its last forward (detached)."""

    ids: torch.Tensor  #: [T, k] int32 chosen experts
    weights: torch.Tensor  #: [T, k] f32 routing weights
    active: torch.Tensor  #: [T, k] int32 realised active units of each chosen expert
    density: torch.Tensor  #: [T, M] f32 predicted active fraction of every expert


def expert_l0(x: torch.Tensor, w_enc: torch.Tensor, b_enc: torch.Tensor | None) -> torch.Tensor:
    """Realised ``||ReLU(W_enc_j x + b_enc_j)||_0`` of *every* expert for every token, [T, M]
    int64 (evaluates all experts densely: for analysis, not for the forward pass)."""
    u = torch.einsum("td,mkd->tmk", x.float(), w_enc.float())
    if b_enc is not None:
        u = u + b_enc.float().unsqueeze(0)
    return (u > 0).sum(-1)


class MoEXLayer(nn.Module):
    """MoE-X layer: ``x [..., d] -> [..., d]`` over ``num_experts`` ReLU experts of width
    ``d_expert``.

    Parameters ``w_enc [M, D, d]``, ``b_enc [M, D]``, ``w_dec [M, D, d]`` (unit-major decoder:
    row i is unit i's output direction), ``b_dec [M, d]``. Forward: router statistics
    (:func:`moeops.moex_router_stats`; cached per weight version when no gradient is needed),
    :func:`moeops.moex_route` (``select``, top ``top_k``, softmax over the selected scores),
    :func:`moeops.moex_experts` (sparse down-projection, ``down`` path), then dropout.
    ``record=True`` keeps a :class:`MoexRecord` of the last call in ``self.last``.
    """

    def __init__(self, d_model: int, d_expert: int, num_experts: int = 8, top_k: int = 2, *,
                 select: str = "sparsest", bias: bool = True, down: str = "auto",
                 dropout: float = 0.0, record: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if select not in ("sparsest", "densest"):
            raise ValueError(f"select must be 'sparsest' or 'densest', got {select!r}")
        if down not in ("auto", "dense", "sparse"):
            raise ValueError(f"down must be 'auto', 'dense' or 'sparse', got {down!r}")
        f = dict(device=device, dtype=dtype)
        self.d_model, self.d_expert, self.num_experts, self.top_k = (d_model, d_expert,
                                                                     num_experts, top_k)
        self.select, self.down, self.record, self.backend = select, down, record, backend
        self.w_enc = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **f))
        self.w_dec = nn.Parameter(torch.empty(num_experts, d_expert, d_model, **f))
        self.b_enc = nn.Parameter(torch.empty(num_experts, d_expert, **f)) if bias else None
        self.b_dec = nn.Parameter(torch.empty(num_experts, d_model, **f)) if bias else None
        self.dropout = nn.Dropout(dropout)
        self.last: MoexRecord | None = None
        self._stats_cache = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init for each expert's two projections."""
        be, bd = 1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_expert)
        with torch.no_grad():
            self.w_enc.uniform_(-be, be)
            self.w_dec.uniform_(-bd, bd)
            if self.b_enc is not None:
                self.b_enc.uniform_(-be, be)
                self.b_dec.uniform_(-bd, bd)
        self._stats_cache = None

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_expert={self.d_expert}, "
                f"num_experts={self.num_experts}, "
                f"top_k={self.top_k}, select={self.select!r}, down={self.down!r}")

    def router_stats(self) -> MoexStats:
        """``(mu, var, bias_mean)`` of the encoders; differentiable when gradients are on,
        otherwise cached until the weights change (in-place updates bump tensor versions)."""
        needs_grad = torch.is_grad_enabled() and (
            self.w_enc.requires_grad or (self.b_enc is not None and self.b_enc.requires_grad))
        if needs_grad or torch.compiler.is_compiling():  # no Python-side cache in compiled graphs
            self._stats_cache = None
            return moex_router_stats(self.w_enc, self.b_enc, backend=self.backend)
        key = (self.w_enc.data_ptr(), self.w_enc._version, self.w_enc.device, self.w_enc.dtype,
               None if self.b_enc is None else (self.b_enc.data_ptr(), self.b_enc._version))
        if self._stats_cache is None or self._stats_cache[0] != key:
            with torch.no_grad():
                st = moex_router_stats(self.w_enc, self.b_enc, backend=self.backend)
            self._stats_cache = (key, st)
        return self._stats_cache[1]

    def route(self, x2d: torch.Tensor, *, mask=None, mask_mode="reroute", forced=None,
              return_density=False) -> MoexRouting:
        """Routing of tokens ``x2d [T, d]`` (see :func:`moeops.moex_route`)."""
        st = self.router_stats()
        return moex_route(x2d, st.mu, st.var, st.bias_mean, self.top_k, select=self.select,
                                   mask=mask, mask_mode=mask_mode, forced=forced,
                                   return_density=return_density, backend=self.backend)

    def forward(self, x: torch.Tensor, *, mask=None, mask_mode: str = "reroute",
                forced=None) -> torch.Tensor:
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        r = self.route(h, mask=mask, mask_mode=mask_mode, forced=forced,
                       return_density=self.record)
        out, active = moex_experts(h, r.ids, r.weights, self.w_enc, self.b_enc, self.w_dec,
                                            self.b_dec, down=self.down, return_active=self.record,
                                            backend=self.backend)
        if self.record:
            self.last = MoexRecord(r.ids.detach(), r.weights.detach(), active.detach(),
                                   r.density.detach())
        return self.dropout(out).reshape(shape)

    @torch.no_grad()
    def code(self, x: torch.Tensor) -> MoexCode:
        """The wide sparse code ``z`` of tokens ``x [..., d]`` as CSR (:func:`moeops.moex_code`)."""
        h = x.reshape(-1, x.shape[-1])
        r = self.route(h)
        return moex_code(h, r.ids, r.weights, self.w_enc, self.b_enc, backend=self.backend)

    @classmethod
    def from_dense_mlp(cls, mlp: nn.Module, num_experts: int = 8, top_k: int = 2, *,
                       noise: float = 0.0, seed: int = 0, **kwargs) -> "MoEXLayer":
        """Upcycle a dense MLP into ``num_experts`` ReLU experts, each a copy of it.

        Accepts GPT-2's ``GPT2MLP`` (``c_fc``/``c_proj`` Conv1D, weight ``[in, out]``), a module
        with ``fc1``/``fc2`` ``nn.Linear`` layers, or an ``nn.Sequential`` whose first and last
        ``nn.Linear`` are the two projections. The activation becomes ReLU (MoE-X experts are
        ReLU MLPs; a GELU model changes function until trained). ``noise`` > 0 adds Gaussian
        noise of ``noise * std(W)`` to each copy's encoder (seeded by ``seed``) so experts
        differ; with ``noise=0`` the layer equals the ReLU version of the MLP (weights sum to 1).
        Dropout is taken from ``mlp.dropout`` when present. Parameters are copies.
        """
        w1, b1, w2t, b2, p = _dense_mlp_weights(mlp)
        D, d = w1.shape
        kwargs.setdefault("dropout", p)
        layer = cls(d, D, num_experts, top_k, bias=True, device=w1.device, dtype=w1.dtype, **kwargs)
        g = torch.Generator(device="cpu").manual_seed(seed)
        with torch.no_grad():
            for j in range(num_experts):
                we = w1.clone()
                if noise > 0:
                    we += (torch.randn(w1.shape, generator=g)
                           * (noise * float(w1.float().std()))).to(we)
                layer.w_enc[j].copy_(we)
                layer.w_dec[j].copy_(w2t)
                layer.b_enc[j].copy_(b1 if b1 is not None else torch.zeros(D))
                layer.b_dec[j].copy_(b2 if b2 is not None else torch.zeros(d))
        layer._stats_cache = None
        layer.train(mlp.training)
        return layer


def _dense_mlp_weights(mlp: nn.Module):
    """(w_enc [D, d], b_enc [D] | None, w_dec unit-major [D, d], b_dec [d] | None, dropout p)."""
    p = float(mlp.dropout.p) if isinstance(getattr(mlp, "dropout", None), nn.Dropout) else 0.0
    if hasattr(mlp, "c_fc") and hasattr(mlp, "c_proj"):  # GPT-2 Conv1D: y = x @ W + b, W [in, out]
        fc, pr = mlp.c_fc, mlp.c_proj
        return (fc.weight.detach().t(), fc.bias.detach(), pr.weight.detach(),
                pr.bias.detach(), p)
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        lin = [mlp.fc1, mlp.fc2]
    elif isinstance(mlp, nn.Sequential):
        lin = [m for m in mlp if isinstance(m, nn.Linear)]
        drops = [m for m in mlp if isinstance(m, nn.Dropout)]
        p = float(drops[-1].p) if drops else p
        if len(lin) < 2:
            raise ValueError("from_dense_mlp: an nn.Sequential MLP needs two nn.Linear layers, "
                             f"found {len(lin)}")
        lin = [lin[0], lin[-1]]
    else:
        raise TypeError("from_dense_mlp: expected a GPT-2 MLP (c_fc/c_proj), a module with "
                        f"fc1/fc2, or nn.Sequential(Linear, act, Linear); got {type(mlp).__name__}")
    fc1, fc2 = lin
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        raise TypeError("from_dense_mlp: fc1/fc2 must be nn.Linear")
    if fc2.in_features != fc1.out_features or fc2.out_features != fc1.in_features:
        raise ValueError(f"from_dense_mlp: shapes do not form d -> D -> d: {fc1} then {fc2}")
    return (fc1.weight.detach(), None if fc1.bias is None else fc1.bias.detach(),
            fc2.weight.detach().t(), None if fc2.bias is None else fc2.bias.detach(), p)


def upcycle_gpt2(model: nn.Module, num_experts: int = 8, top_k: int = 2, *,
                 layers: list[int] | None = None, noise: float = 0.0, seed: int = 0,
                 **kwargs) -> list[MoEXLayer]:
    """Replace the MLP of GPT-2-style blocks (``model.transformer.h[i].mlp`` or ``model.h``)
    by :meth:`MoEXLayer.from_dense_mlp` upcycled MoE-X layers, in place. ``layers`` selects
    block indices (default: all). Each layer gets seed ``seed + i``. Returns the new layers."""
    blocks = getattr(getattr(model, "transformer", model), "h", None)
    if blocks is None:
        raise TypeError("upcycle_gpt2: expected a GPT-2-style model with transformer.h blocks")
    out = []
    for i, block in enumerate(blocks):
        if layers is not None and i not in layers:
            continue
        layer = MoEXLayer.from_dense_mlp(block.mlp, num_experts, top_k, noise=noise,
                                         seed=seed + i, **kwargs)
        layer.train(block.mlp.training)
        block.mlp = layer
        out.append(layer)
    return out
