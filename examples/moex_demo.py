"""MoE-X worked example: same as ``moeops moex-demo`` (see python/moeops/tools/moex_demo.py).

    python examples/moex_demo.py            # GPT-2-small shape, ~1-3 minutes on CPU
    python examples/moex_demo.py --quick    # a few seconds
"""
from moeops.tools.moex_demo import main

raise SystemExit(main())
