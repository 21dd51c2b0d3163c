"""MoE layer shapes of real models (one layer): experts E, top-k K, hidden H, expert width I.

``I_shared``: width of the layer's shared expert where the experts benchmark includes one
(Qwen1.5-MoE-A2.7B: one shared expert of width 5632 behind a sigmoid gate). DeepSeek-V2-Lite
also has 2 shared experts (width 2 x 1408) and a dense first layer; the benchmarks time its
routed experts only. The experts benchmark's own copy of these shapes is
``moeops.bench_experts.LAYERS`` (the installed ``moeops bench`` cannot read this file);
``bench/test_bench_experts.py`` checks that the two agree.
"""

MODELS = {
    "mixtral-8x7b": dict(E=8, K=2, H=4096, I=14336),
    "qwen1.5-moe-a2.7b": dict(E=60, K=4, H=2048, I=1408, I_shared=5632),
    "qwen3-30b-a3b": dict(E=128, K=8, H=2048, I=768),
    "olmoe-1b-7b": dict(E=64, K=8, H=2048, I=1024),
    "deepseek-v2-lite": dict(E=64, K=6, H=2048, I=1408),
    "deepseek-v3": dict(E=256, K=8, H=7168, I=2048, n_group=8, topk_group=4),
}

# the models of the experts benchmark (those with a Hugging Face experts module built there)
EXPERTS_MODELS = ("qwen3-30b-a3b", "olmoe-1b-7b", "qwen1.5-moe-a2.7b", "mixtral-8x7b",
                  "deepseek-v2-lite")
# token counts of the full experts benchmark, and the small ones the pytest suite runs by default
EXPERTS_TOKENS = (1, 4, 16, 64, 256, 1024)
EXPERTS_TOKENS_SMALL = (1, 4)
EXPERTS_DTYPES = ("fp32", "bf16")
