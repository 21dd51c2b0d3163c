"""MoE layer shapes of real models (one layer): experts E, top-k K, hidden H, expert width I."""

MODELS = {
    "mixtral-8x7b": dict(E=8, K=2, H=4096, I=14336),
    "qwen1.5-moe-a2.7b": dict(E=60, K=4, H=2048, I=1408),
    "qwen3-30b-a3b": dict(E=128, K=8, H=2048, I=768),
    "olmoe-1b-7b": dict(E=64, K=8, H=2048, I=1024),
    "deepseek-v2-lite": dict(E=64, K=6, H=2048, I=1408),
    "deepseek-v3": dict(E=256, K=8, H=7168, I=2048, n_group=8, topk_group=4),
}
