"""Helpers the tests share (importable as ``support`` because ``tests/`` is on ``sys.path``
through ``tests/conftest.py``):

* :mod:`support.samples`: sample inputs of every op (opcheck, registry and permute tests);
* :mod:`support.hf_tiny`: tiny random Hugging Face MoE models of every patched family, batches,
  and an op counter;
* :mod:`support.iv_torch`: the pure-torch routing oracle of the interventions tests;
* here: whether CUDA tests can run, and why not.
"""

import torch

import moeops


def cuda_ready() -> bool:
    """A CUDA GPU is visible and moeops was built with its CUDA kernels."""
    return torch.cuda.is_available() and bool(moeops._C.with_cuda)


CUDA_SKIP_REASON = ("needs a CUDA GPU and moeops built with CUDA kernels "
                    f"(cuda available: {torch.cuda.is_available()}, "
                    f"built with CUDA: {bool(moeops._C.with_cuda)})")
