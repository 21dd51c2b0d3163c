"""Command-line tools beside the benchmarks:

* :mod:`moeops.tools.profile`: ``moeops profile``, routing statistics of a model on prompts
  (JSON and a layers x experts heatmap);
* :mod:`moeops.tools.moex_demo`: ``moeops moex-demo`` (and ``examples/moex_demo.py``), the
  MoE-X worked example.
"""
