"""benchmarks/engine_profile.py: the exported graph's MACs per class add up to torch's FlopCounterMode count, the
classes separate dense, depthwise and matrix-product work from the rest, and both engines' profiles cover the call."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from nnunet_lk.analysis import count_macs

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "engine_profile.py"
spec = importlib.util.spec_from_file_location("engine_profile", SCRIPT)
engine_profile = importlib.util.module_from_spec(spec)
spec.loader.exec_module(engine_profile)


class Tiny(nn.Module):
    """A dense 3x3 conv, a depthwise 5x5 conv, a token matmul (Linear) and a transposed conv: every MAC class."""

    def __init__(self):
        super().__init__()
        self.dense = nn.Conv2d(2, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 5, padding=2, groups=8)
        self.linear = nn.Linear(8, 16)
        self.up = nn.ConvTranspose2d(16, 4, 2, stride=2)

    def forward(self, x):
        x = torch.relu(self.dense(x))
        x = self.depthwise(x) * torch.sigmoid(x)
        x = self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.up(x.softmax(1))


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    pytest.importorskip("onnxruntime")
    from nnunet_lk.export import export_network
    net = Tiny().eval()
    path = str(tmp_path_factory.mktemp("profile") / "tiny.onnx")
    export_network(net, path, 2, [1, 1], [24, 20])
    return net, path


def test_graph_macs_per_class_add_up_to_flopcountermodes_count(tiny_onnx):
    net, path = tiny_onnx
    shape = [1, 2, 24, 20]
    macs = engine_profile.graph_macs(path, shape)
    pixels = 24 * 20
    assert macs.get("conv", 0) == pixels * 8 * 2 * 9 + pixels * 16 * 4 * 4  # dense conv + transposed conv
    assert macs.get("depthwise conv", 0) == pixels * 8 * 25
    assert macs.get("matmul", 0) == pixels * 16 * 8
    assert sum(macs.values()) == count_macs(net, shape)  # torch's own count of the same network


def test_onnxruntime_profile_covers_every_class_of_the_call(tiny_onnx):
    _, path = tiny_onnx
    profile = engine_profile.profile_onnxruntime(path, [1, 2, 24, 20], threads=1, repeats=3, warmup=1)
    assert set(profile["class_ms"]) == set(engine_profile.CLASSES)
    assert profile["class_ms"]["elementwise"] > 0 and profile["class_ms"]["reduce/softmax"] > 0
    assert 0 < profile["profiled_ms"] and 0 < profile["wall_ms"] and profile["nodes"] >= 6


def test_openvino_profile_covers_the_executed_nodes(tiny_onnx):
    pytest.importorskip("openvino")
    _, path = tiny_onnx
    profile = engine_profile.profile_openvino(path, [1, 2, 24, 20], threads=1, repeats=3, warmup=1)
    assert profile["class_ms"]["conv"] > 0 and profile["class_ms"]["depthwise conv"] > 0
    assert profile["nodes"] > 0 and profile["profiled_ms"] > 0


@pytest.mark.parametrize("op,inputs,expected", [
    ("Conv", [[1, 8, 9, 9], [8, 1, 3, 3]], "depthwise conv"),
    ("Conv", [[1, 8, 9, 9], [4, 8, 1, 1]], "conv"),
    ("Conv", [[1, 1, 9, 9], [4, 1, 3, 3]], "conv"),  # one input channel: dense, not depthwise
    ("FusedMatMul", [[1, 5, 8], [8, 3]], "matmul"),
    ("ReorderInput", [[1, 8, 9, 9]], "data movement"),
    ("DequantizeLinear", [[4], [1]], "(de)quantise"),
    ("BiasGelu", [[1, 8], [8]], "elementwise"),
])
def test_onnxruntime_classes(op, inputs, expected):
    assert engine_profile.ort_class(op, inputs) == expected


def test_int8_convolutions_keep_their_class(tiny_onnx, tmp_path):
    """ONNX Runtime runs INT8 convolutions as QLinearConv with prepacked weights: the class comes from the graph."""
    pytest.importorskip("onnxruntime")
    from nnunet_lk.quantize import quantize_onnx
    _, path = tiny_onnx
    int8 = str(tmp_path / "tiny.int8.onnx")
    rng = np.random.default_rng(0)
    quantize_onnx(path, int8, [rng.standard_normal((1, 2, 24, 20)).astype(np.float32) for _ in range(4)])
    assert sorted(engine_profile.conv_kinds(int8).values()) == ["conv", "conv", "depthwise conv"]
    profile = engine_profile.profile_onnxruntime(int8, [1, 2, 24, 20], threads=1, repeats=3, warmup=1)
    assert profile["class_ms"]["depthwise conv"] > 0 and profile["class_ms"]["(de)quantise"] > 0


@pytest.mark.parametrize("node_type,originals,expected", [
    ("GroupConvolution", ["grouped"], "conv"),  # two groups of 4 channels: dense work, not depthwise
    ("GroupConvolution", ["dw"], "depthwise conv"),
    ("Subgraph", ["t1", "mm1", "softmax", "mm2", "t2"], "matmul"),  # an attention fused into one subgraph
    ("Subgraph", ["sub", "mul"], "elementwise"),
    ("GroupConvolution", [], "depthwise conv"),  # nothing known of its origin: by type
    ("Reorder", ["mm1"], "matmul"),
])
def test_openvino_classes_follow_the_onnx_nodes_a_node_runs(node_type, originals, expected):
    kinds = {"grouped": "conv", "dw": "depthwise conv"}
    assert engine_profile.ov_class(node_type, originals, kinds, {"mm1", "mm2"}) == expected


class GroupedAttention(nn.Module):
    """A two-group 3x3 conv and a 4-head self-attention over the pixels (MatMul, Softmax, MatMul)."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        b, c, h, w = x.shape
        x = self.grouped(x)
        q, k, v = self.qkv(x.flatten(2).transpose(1, 2)).reshape(b, h * w, 3, 4, 2).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return out.permute(0, 1, 3, 2).reshape(b, c, h, w)


def test_openvino_files_grouped_convs_and_attention_under_their_mac_classes(tmp_path):
    pytest.importorskip("openvino")
    from nnunet_lk.export import export_network
    path = str(tmp_path / "grouped_attention.onnx")
    export_network(GroupedAttention().eval(), path, 8, [1, 1], [16, 16])
    assert list(engine_profile.conv_kinds(path).values()) == ["conv"]
    assert engine_profile.matmul_nodes(path)
    profile = engine_profile.profile_openvino(path, [1, 8, 16, 16], threads=1, repeats=3, warmup=1)
    classes = profile["class_ms"]
    assert classes["conv"] > 0 and classes["matmul"] > 0 and classes["depthwise conv"] == 0, classes
