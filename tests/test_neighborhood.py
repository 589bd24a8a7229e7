"""blocks.neighborhood: the streaming (memory-lean) and sliced (export) neighbourhood attention against the reference
form."""
import pytest
import torch

from nnunet_lk.blocks.neighborhood import (neighborhood_attention, sliced_neighborhood_attention,
                                           streaming_neighborhood_attention)
from nnunet_lk.memory.tracker import LiveStorageTracker

CASES = [((2, 3, 2, 7, 9), (3, 3)),        # 2D, several heads and head dims
         ((1, 2, 1, 5, 6, 4), (3, 3, 3)),  # 3D, head_dim 1 as LM-Net's skips have
         ((1, 2, 2, 2, 6), (3, 5))]        # an axis shorter than its kernel, an anisotropic kernel


def _inputs(shape, kernel, dtype=torch.double, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, dtype=dtype, generator=g).requires_grad_() for _ in range(3))
    rpb = torch.randn(shape[1], *[2 * kk - 1 for kk in kernel], dtype=dtype, generator=g).requires_grad_()
    return q, k, v, rpb


@pytest.mark.parametrize("form,shape,kernel",
                         [("streaming", *c) for c in CASES] +
                         [("sliced", *c) for c in CASES + [((1, 1, 3, 4, 5, 7), (3, 5, 5)),     # head_dim 3
                                                           ((1, 2, 1, 3, 2, 9), (5, 3, 3))]])  # two short axes
@pytest.mark.parametrize("bias", [True, False])
def test_streaming_and_sliced_forms_compute_the_reference_outputs_and_gradients(form, shape, kernel, bias):
    q, k, v, rpb = _inputs(shape, kernel)
    rpb = rpb if bias else None
    inputs = (q, k, v, rpb) if bias else (q, k, v)
    ref = neighborhood_attention(q, k, v, kernel, rpb)
    attend = streaming_neighborhood_attention if form == "streaming" else sliced_neighborhood_attention
    out = attend(q, k, v, kernel, rpb)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    upstream = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(out, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_streaming_gradients_pass_gradcheck():
    q, k, v, rpb = _inputs((1, 2, 2, 4, 5), (3, 3))
    assert torch.autograd.gradcheck(lambda *t: streaming_neighborhood_attention(*t[:3], (3, 3), t[3]), (q, k, v, rpb))


def test_under_autocast_the_softmax_runs_in_float32_and_the_result_has_the_inputs_dtype():
    q, k, v, rpb = (t.detach().to(torch.bfloat16) for t in _inputs((1, 2, 2, 6, 6), (3, 3), dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = neighborhood_attention(q, k, v, (3, 3), rpb)
        out = streaming_neighborhood_attention(q, k, v, (3, 3), rpb)
    exact = neighborhood_attention(*(t.double() for t in (q, k, v)), (3, 3), rpb.double())
    assert out.dtype == torch.bfloat16
    # as close as bfloat16 rounding of the result allows, closer than the reference's bfloat16 softmax
    assert (out.double() - exact).abs().max() <= (ref.double() - exact).abs().max()
    torch.testing.assert_close(out.double(), exact, rtol=1e-2, atol=1e-2)


def _training_peak(attention, shape, kernel):
    q, k, v, rpb = (torch.empty(s, device="meta", requires_grad=True)
                    for s in (shape, shape, shape, (shape[1], *[2 * kk - 1 for kk in kernel])))
    with LiveStorageTracker() as tracker:
        attention(q, k, v, kernel, rpb).sum().backward()
    return tracker.peak


def test_streaming_memory_does_not_grow_with_the_window():
    # LM-Net's full-resolution skip in 3D: 12 heads of one channel; the reference keeps k^d logits and weights
    shape = (2, 12, 1, 40, 56, 40)
    feature = 2 * 12 * 40 * 56 * 40 * 4
    reference = _training_peak(neighborhood_attention, shape, (3, 3, 3))
    streaming = _training_peak(streaming_neighborhood_attention, shape, (3, 3, 3))
    wider = _training_peak(streaming_neighborhood_attention, shape, (5, 5, 5))
    assert reference > 50 * feature
    assert streaming < 20 * feature < reference / 4 and wider == pytest.approx(streaming, rel=0.01)
