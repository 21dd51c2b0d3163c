"""``moeops moex-demo`` (also ``examples/moex_demo.py``): upcycle a GPT-2-small-shaped model
(built from a config, random weights, no downloads) into MoE-X layers, train the MoE-X layers
briefly on a synthetic corpus on CPU, and report what the paper is about: realised density of
chosen vs unchosen experts, ``||z||_0`` per token of the wide code, and the sparse vs dense
down-projection speed on the trained layer's real activations. ``--quick`` is a seconds-long
version on a tiny model (run in CI by tests/ops/test_moex.py)."""

from __future__ import annotations

import argparse

import torch

from moeops._timing import Stopwatch, median, time_interleaved
from moeops.moex import MoEXLayer, expert_l0, upcycle_gpt2
from moeops.ops import moex_experts


def synthetic_corpus(vocab: int, n_tokens: int, branching: int = 4, seed: int = 0) -> torch.Tensor:
    """A first-order Markov 'language': every token has ``branching`` possible successors with
    fixed probabilities, so the best achievable loss is about ln(branching) nats."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, branching), generator=g)
    probs = torch.softmax(torch.randn(vocab, branching, generator=g), -1)
    out = torch.empty(n_tokens, dtype=torch.long)
    t = int(torch.randint(0, vocab, (1,), generator=g))
    choice = torch.multinomial(probs, n_tokens, replacement=True, generator=g)  # [vocab, n]
    for i in range(n_tokens):
        out[i] = t
        t = int(succ[t, choice[t, i]])
    return out


def _medians_ms(fns: dict, rounds: int) -> dict:
    """Median ms of each callable (taking the round number) over ``rounds`` round-robin
    rounds, after one warm-up round."""
    ts = time_interleaved(fns, min_rounds=rounds, max_rounds=rounds, budget=0.0, warmup=1)
    return {k: median(v) * 1e3 for k, v in ts.items()}


def run_demo(quick: bool = False, steps: int | None = None, layers: list[int] | None = None,
             seed: int = 0, plot: str | None = None, log=print) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if quick:
        cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                         bos_token_id=0, eos_token_id=0)
        batch, seq, steps = 4, 32, steps or 8
        layers = layers if layers is not None else [1]
        experts, top_k, lr = 8, 2, 3e-3
    else:  # GPT-2 small's shape: d=768, 12 layers, 12 heads, D=3072 (vocab cut for the corpus)
        cfg = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=512, n_positions=256,
                         bos_token_id=0, eos_token_id=0)
        batch, seq, steps = 4, 32, steps or 20
        layers = layers if layers is not None else [11]
        experts, top_k, lr = 8, 2, 1e-3
    model = GPT2LMHeadModel(cfg)
    moex_layers = upcycle_gpt2(model, experts, top_k, layers=layers, noise=0.05, seed=seed,
                               record=True, dropout=0.0)
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for layer in moex_layers for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    n_params = sum(p.numel() for p in params)
    log(f"model: GPT-2 shape d={cfg.n_embd} layers={cfg.n_layer} heads={cfg.n_head} "
        f"vocab={cfg.vocab_size}; MoE-X in blocks {layers}: {experts} experts x D="
        f"{moex_layers[0].d_expert}, top-{top_k}, {n_params / 1e6:.1f}M trainable parameters")
    corpus = synthetic_corpus(cfg.vocab_size, batch * seq * (steps + 1) + 1, seed=seed)
    opt = torch.optim.AdamW(params, lr=lr)
    captured = {}
    hook = moex_layers[-1].register_forward_hook(
        lambda mod, args, out: captured.__setitem__(
            "x", args[0].detach().reshape(-1, args[0].shape[-1])))
    model.train()
    clock = Stopwatch()
    losses = []
    for step in range(steps):
        chunk = corpus[step * batch * seq:(step + 1) * batch * seq].view(batch, seq)
        loss = model(chunk, labels=chunk).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step in (0, steps - 1) or (step + 1) % max(1, steps // 5) == 0:
            log(f"step {step + 1:>3}/{steps}  loss {losses[-1]:.3f}")
    train_s = clock.elapsed()
    log(f"trained {steps} steps in {train_s:.1f} s (loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
        f"a {cfg.vocab_size}-token uniform guess is "
        f"{torch.log(torch.tensor(float(cfg.vocab_size))):.3f})")

    # analysis on a held-out batch
    model.eval()
    held = corpus[-batch * seq - 1:-1].view(batch, seq)
    with torch.no_grad():
        model(held)
    hook.remove()
    layer: MoEXLayer = moex_layers[-1]
    x = captured["x"]
    rec = layer.last
    D = layer.d_expert
    with torch.no_grad():
        l0 = expert_l0(x, layer.w_enc, layer.b_enc).float()  # [T, M]
        chosen = torch.zeros_like(l0, dtype=torch.bool)
        chosen.scatter_(1, rec.ids.long().clamp(min=0), rec.ids >= 0)
        dens_chosen = float(l0[chosen].mean()) / D
        dens_unchosen = float(l0[~chosen].mean()) / D if bool((~chosen).any()) else float("nan")
        code = layer.code(x)
    zl0 = code.l0.float()
    log(f"block {layers[-1]}: realised density of chosen experts {dens_chosen:.3f}, "
        f"unchosen experts {dens_unchosen:.3f} (predicted for chosen: "
        f"{float(rec.density[chosen].mean()):.3f})")
    log(f"||z||_0 per token: mean {float(zl0.mean()):.0f}, min {int(zl0.min())}, "
        f"max {int(zl0.max())} of M*D = {layer.num_experts * D} "
        f"({float(zl0.mean()) / (layer.num_experts * D):.2%} of the wide code)")

    # sparse vs dense down-projection on these activations
    T_speed = min(16, x.shape[0])
    xs = x[:T_speed]
    with torch.no_grad():
        r = layer.route(xs)
        args = (xs, r.ids, r.weights, layer.w_enc, layer.b_enc, layer.w_dec, layer.b_dec)
        _, active = moex_experts(*args, return_active=True)
        dens = float(active[r.ids >= 0].float().mean()) / D
        t = _medians_ms({"sparse": lambda _: moex_experts(*args, down="auto"),
                         "dense": lambda _: moex_experts(*args, down="dense")},
                        rounds=5 if quick else 15)
    log(f"sparse down-projection: experts op at T={T_speed} (density {dens:.3f}): "
        f"{t['sparse']:.3f} ms with down='auto' vs {t['dense']:.3f} ms dense "
        f"({t['dense'] / t['sparse']:.2f}x)")
    res = dict(losses=losses, train_seconds=train_s, density_chosen=dens_chosen,
               density_unchosen=dens_unchosen, z_l0_mean=float(zl0.mean()),
               experts_ms_sparse=t["sparse"], experts_ms_dense=t["dense"], speed_density=dens)
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
        ax[0].bar(["chosen", "unchosen"], [dens_chosen, dens_unchosen])
        ax[0].set_ylabel("realised density (L0 / D)")
        ax[1].hist(zl0.numpy(), bins=30)
        ax[1].set_xlabel("||z||_0 per token")
        fig.tight_layout()
        fig.savefig(plot)
        log(f"plot written to {plot}")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moeops moex-demo", description=__doc__)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny model, a few seconds (CI)")
    p.add_argument("--steps", type=int, default=None, help="training steps (20; quick: 8)")
    p.add_argument("--layers", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="blocks to upcycle, comma-separated (default 11; quick: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="write a figure (matplotlib)")


def run_from_args(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    run_demo(quick=args.quick, steps=args.steps, layers=args.layers, seed=args.seed, plot=args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
