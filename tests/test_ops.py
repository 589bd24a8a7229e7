"""Dimension-agnostic layer helpers (``nnunet_lk/blocks/ops.py``)."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_lk.blocks.ops import adaptive_avg_pool


@pytest.mark.parametrize("shape,size", [
    ((2, 3, 17, 11), (4, 3)),         # bins of unequal length that overlap (17 -> 4)
    ((1, 2, 8, 8), (8, 8)),           # identity
    ((1, 2, 9, 7), (1, 1)),           # global average
    ((2, 2, 13, 10, 7), (3, 5, 2)),   # 3D: torch's op has no ONNX translation, ours must equal it
    ((1, 1, 5, 6, 4), (5, 3, 4)),
])
def test_adaptive_avg_pool_equals_torch(shape, size):
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    reference = (F.adaptive_avg_pool2d if len(shape) == 4 else F.adaptive_avg_pool3d)(x, size)
    ours = adaptive_avg_pool(x, size)
    assert ours.shape == reference.shape
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    g = torch.randn_like(reference)
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    (grad_ref,) = torch.autograd.grad(reference, x, g)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)
