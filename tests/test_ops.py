"""Dimension-agnostic layer helpers (``nnunet_lk/blocks/ops.py``)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_lk.blocks.ops import AxiswiseGroupNorm, adaptive_avg_pool, with_axiswise_norms


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


@pytest.mark.parametrize("norm", [nn.GroupNorm(4, 8), nn.GroupNorm(2, 8, affine=False), nn.InstanceNorm2d(8, affine=True),
                                  nn.InstanceNorm3d(8, affine=True), nn.InstanceNorm3d(8)])
def test_axiswise_group_norm_is_the_same_function(norm):
    with torch.no_grad():
        if getattr(norm, "weight", None) is not None:
            norm.weight.uniform_(0.5, 1.5), norm.bias.uniform_(-0.5, 0.5)
    spatial = (9, 7, 5) if isinstance(norm, nn.InstanceNorm3d) else (9, 7)
    x = torch.randn(2, 8, *spatial) * 3 + 1
    torch.testing.assert_close(AxiswiseGroupNorm.replacing(norm)(x), norm(x))


def test_with_axiswise_norms_replaces_only_input_statistics_norms():
    net = nn.Sequential(nn.Conv3d(1, 8, 3), nn.InstanceNorm3d(8, affine=True), nn.BatchNorm3d(8),
                        nn.Sequential(nn.GroupNorm(2, 8)), nn.InstanceNorm3d(8, track_running_stats=True))
    with_axiswise_norms(net)
    assert [type(m).__name__ for m in net.modules()][1:] == [
        "Conv3d", "AxiswiseGroupNorm", "BatchNorm3d", "Sequential", "AxiswiseGroupNorm", "InstanceNorm3d"]


def test_axiswise_norm_is_accurate_in_onnxruntime_on_a_large_map(tmp_path):
    # onnxruntime's InstanceNormalization sums a whole instance in one float32 pass; on 96³ voxels its
    # error is ~100x torch's. The axis-by-axis form brings it back to torch's level.
    import onnxruntime as ort
    norm = nn.InstanceNorm3d(4, affine=True).eval()
    x = torch.randn(1, 4, 96, 96, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2 + 3
    exact = torch.nn.functional.instance_norm(x, weight=norm.weight.double(), bias=norm.bias.double(), eps=norm.eps)
    errors = {}
    for name, module in (("onnx_op", norm), ("axiswise", AxiswiseGroupNorm.replacing(norm))):
        path = str(tmp_path / f"{name}.onnx")
        torch.onnx.export(module, (torch.randn(1, 4, 8, 8, 8),), path, dynamo=False, input_names=["x"],
                          dynamic_axes={"x": {2: "d", 3: "h", 4: "w"}})
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        out = torch.from_numpy(session.run(None, {"x": x.float().numpy()})[0]).double()
        errors[name] = (out - exact).abs().max().item()
    errors["torch"] = (norm(x.float()).double() - exact).abs().max().item()
    # measured: onnx_op 5e-5, axiswise 1e-6, torch 5e-7
    assert errors["axiswise"] < 10 * errors["torch"] and errors["onnx_op"] > 10 * errors["axiswise"], errors


def test_every_per_dimension_question_accepts_conv_subclasses():
    from nnunet_lk.blocks import ops

    class MyConv3d(nn.Conv3d):
        pass
    for conv_op, dim in ((nn.Conv2d, 2), (MyConv3d, 3), (ops.conv_for_dim(2), 2), (ops.conv_for_dim(3), 3)):
        assert ops.conv_dim(conv_op) == dim
        assert ops.max_pool_op(conv_op) is (nn.MaxPool2d if dim == 2 else nn.MaxPool3d)
        assert ops.conv_transpose_op(conv_op) is (nn.ConvTranspose2d if dim == 2 else nn.ConvTranspose3d)
        assert ops.instance_norm_op(conv_op) is (nn.InstanceNorm2d if dim == 2 else nn.InstanceNorm3d)
        assert type(ops.make_norm("batch", conv_op, 4)) is (nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d)
        assert ops.linear_interpolation_mode(dim) == ("bilinear" if dim == 2 else "trilinear")
    with pytest.raises(ValueError, match="Conv2d or torch.nn.Conv3d"):
        ops.conv_dim(nn.Conv1d)
