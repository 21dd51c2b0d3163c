"""torch.library.opcheck for every op and sample: schema, fake kernel, autograd registration,
AOT dispatch (compiled vs eager)."""

import pytest
import torch

from moeops.info import registered_ops
from support.samples import SAMPLES


@pytest.mark.parametrize("name", registered_ops())
def test_opcheck(name, device):
    op = getattr(torch.ops.moeops, name).default
    samples = SAMPLES[name](device)
    assert samples, f"no samples for {name}"
    for args, kwargs in samples:
        torch.library.opcheck(op, args, kwargs)
