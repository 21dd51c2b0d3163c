"""``moeops bench``: the benchmark suites, one module each (``--suite NAME``).

* :mod:`moeops.bench.experts` (default): ``fused_experts`` vs Hugging Face's experts
  implementations and the reference on real MoE layer shapes, against the machine's limits
  (table and chart: :mod:`moeops.bench.experts_report`);
* :mod:`moeops.bench.gemm`: the grouped expert GEMM alone vs torch's grouped_mm and a dense mm;
* :mod:`moeops.bench.routing`: the routing pipeline (gating, plan, permute, combine) vs the
  reference;
* :mod:`moeops.bench.model`: a small Qwen3-MoE model, patched vs unpatched, prefill and decode;
* :mod:`moeops.bench.interventions`: the cost of :mod:`moeops.interventions` on one layer;
* :mod:`moeops.bench.moex`: MoE-X sparse vs dense down-projection and layer.

:mod:`moeops.bench.harness` holds what several suites share (machine limits, CPU load and
model, progress, relative error, deadline note, forced CUDA GEMM path). Timing is
:mod:`moeops._timing`'s, shapes :mod:`moeops.models`'. ``bench/`` (top level) wraps these suites
for pytest-benchmark.
"""
