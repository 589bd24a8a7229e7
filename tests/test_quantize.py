"""INT8 quantisation (nnunet_lk/quantize.py): calibration patches from nnU-Net's preprocessed cases, the QDQ
model against fp32 on a small network, and the rules `predict --int8` applies before it runs a model. The run on
a trained fold with real validation cases is in test_e2e_realdata.py."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from nnunet_lk.checkpoints import checkpoint_stamp
from nnunet_lk.cli.main import main as cli_main
from nnunet_lk.errors import UsageError
from nnunet_lk.quantize import (_crop, accepted_int8_model, calibration_patches, cpu_has_vnni,
                                fold_split, int8_path, quantize_onnx, report_path, resolve_reduce_range,
                                saturation_warning)


def _preprocessed_cases(folder, shapes):
    """nnU-Net preprocessed cases (numpy variant): data (1, z, y, x) = 1 + voxel index, one foreground voxel."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetNumpy
    folder.mkdir(parents=True)
    for i, shape in enumerate(shapes):
        data = (1 + np.arange(np.prod(shape), dtype=np.float32)).reshape(1, *shape)
        seg = np.zeros((1, *shape), dtype=np.int8)
        seg[0, shape[0] // 2, 1, 2] = 1
        nnUNetDatasetNumpy.save_case(data, seg, {}, str(folder / f"case_{i}"))
    return [f"case_{i}" for i in range(len(shapes))]


def test_crop_pads_with_zeros_outside_the_array():
    a = np.arange(1, 13, dtype=np.float32).reshape(1, 3, 4)
    out = _crop(a, [-1, 2], [4, 3])
    assert out.shape == (1, 4, 3)
    assert out[0, 0].tolist() == [0, 0, 0]  # row -1
    assert out[0, 1].tolist() == [3, 4, 0]  # row 0, columns 2, 3, (4)
    assert out[0, 3].tolist() == [11, 12, 0]


@pytest.mark.parametrize("patch", [(6, 8), (4, 6, 8), (20, 3)])
def test_calibration_patches_come_from_the_cases_and_every_other_holds_foreground(tmp_path, patch):
    ids = _preprocessed_cases(tmp_path / "pre", [(5, 12, 10), (7, 9, 14)])
    patches = calibration_patches(str(tmp_path / "pre"), ids, patch, 6, seed=3)
    assert len(patches) == 6 and all(p.shape == (1, 1, *patch) and p.dtype == np.float32 for p in patches)
    volumes = {i: (1 + np.arange(np.prod(s), dtype=np.float32)).reshape(s)
               for i, s in zip(ids, [(5, 12, 10), (7, 9, 14)])}
    for k, p in enumerate(patches):
        volume = volumes[ids[k % 2]]
        values = p[p > 0]
        assert values.size and np.isin(values, volume).all()  # real voxels of that case, zeros only as padding
        if k % 2 == 0:  # centred on the foreground voxel (z // 2, 1, 2): its value is in the patch
            assert volume[volume.shape[0] // 2, 1, 2] in values
        if patch == (20, 3):  # taller than the case: padded, never out of bounds
            assert (p == 0).any()
    assert [p.tobytes() for p in patches] == \
        [p.tobytes() for p in calibration_patches(str(tmp_path / "pre"), ids, patch, 6, seed=3)]


def test_quantized_model_tracks_fp32_and_stores_int8_weights(tmp_path):
    pytest.importorskip("onnxruntime")
    from nnunet_lk.export import INPUT_NAME, ort_session
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 3, 1)).eval()
    fp32 = tmp_path / "model.onnx"
    torch.onnx.export(net, (torch.randn(1, 1, 16, 16),), str(fp32), input_names=[INPUT_NAME], output_names=["logits"],
                      dynamic_axes={INPUT_NAME: {0: "b"}}, dynamo=False)
    rng = np.random.default_rng(0)
    patches = [rng.standard_normal((1, 1, 16, 16)).astype(np.float32) for _ in range(8)]
    int8 = tmp_path / "model.int8.onnx"
    quantize_onnx(str(fp32), str(int8), patches)
    import onnx
    model = onnx.load(str(int8))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert any(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in model.graph.initializer)
    dequantized = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert [n.input[1] in dequantized for n in convs] == [False, True, False]  # first and last stay float
    x = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
    a = ort_session(str(fp32)).run(None, {INPUT_NAME: x})[0]
    b = ort_session(str(int8)).run(None, {INPUT_NAME: x})[0]
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()  # quantisation error, not a different function
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.95
    assert not (tmp_path / "model.int8.onnx.partial").exists()


def _int8_weight_range(path) -> tuple:
    import onnx
    from onnx import numpy_helper
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    return min(int(w.min()) for w in weights), max(int(w.max()) for w in weights)


def test_reduce_range_quantises_weights_to_seven_bits(tmp_path):
    pytest.importorskip("onnxruntime")
    fp32 = _residual_onnx(tmp_path)
    rng = np.random.default_rng(0)
    patches = [rng.standard_normal((1, 1, 12, 12)).astype(np.float32) for _ in range(4)]
    ranges = {}
    for seven_bit in (False, True):
        quantize_onnx(str(fp32), str(tmp_path / f"{seven_bit}.onnx"), patches, reduce_range=seven_bit)
        ranges[seven_bit] = _int8_weight_range(tmp_path / f"{seven_bit}.onnx")
    assert ranges == {False: (-127, 127), True: (-64, 64)}  # symmetric per-channel weights: 8 bits, then 7


def test_vnni_is_read_from_the_cpu_flags_and_auto_reduces_range_without_it(tmp_path, monkeypatch):
    import platform
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 avx512f\n")
    assert cpu_has_vnni(str(info)) is False
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert cpu_has_vnni(str(info)) is True
    info.write_text("flags\t\t: fpu avx2 avx_vnni\n")
    assert cpu_has_vnni(str(info)) is True
    assert cpu_has_vnni(str(tmp_path / "missing")) is None
    assert [resolve_reduce_range("auto", v) for v in (False, True, None)] == [True, False, True]
    assert resolve_reduce_range("on", True) and not resolve_reduce_range("off", False)
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu_has_vnni(str(info)) is None and not resolve_reduce_range("auto", None)
    with pytest.raises(UsageError, match="--reduce-range 'yes': choose one of auto, on, off"):
        resolve_reduce_range("yes", None)


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.a, self.b, self.head = (torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1),
                                                torch.nn.Conv2d(8, 8, 1), torch.nn.Conv2d(8, 2, 1))

    def forward(self, x):
        x = torch.relu(self.stem(x))
        return self.head(torch.relu(self.b(torch.relu(self.a(x))) + x) * torch.sigmoid(x))


def _residual_onnx(tmp_path):
    """``_Residual`` (seeded weights) exported to tmp_path/model.onnx."""
    from nnunet_lk.export import INPUT_NAME
    torch.manual_seed(0)
    fp32 = tmp_path / "model.onnx"
    torch.onnx.export(_Residual().eval(), (torch.randn(1, 1, 12, 12),), str(fp32), input_names=[INPUT_NAME],
                      output_names=["logits"], dynamo=False)
    return fp32


@pytest.mark.parametrize("ops", ["all", "conv"])
def test_quantized_operator_types_follow_ops(tmp_path, ops):
    pytest.importorskip("onnxruntime")
    import onnx
    fp32 = _residual_onnx(tmp_path)
    rng = np.random.default_rng(0)
    int8 = tmp_path / "model.int8.onnx"
    quantize_onnx(str(fp32), str(int8), [rng.standard_normal((1, 1, 12, 12)).astype(np.float32) for _ in range(4)],
                  ops=ops)
    graph = onnx.load(str(int8)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    quantized = {producer.get(n.input[0], "input") for n in graph.node if n.op_type == "QuantizeLinear"}
    if ops == "conv":  # only convolutions' results and inputs: no pairs around the residual Add, the gate's Mul
        assert "Conv" in quantized and not quantized & {"Add", "Mul", "Sigmoid"}, quantized
    else:
        assert {"Conv", "Add", "Mul", "Sigmoid"} <= quantized, quantized
    with pytest.raises(UsageError, match="--ops 'gemm': choose one of all, conv"):
        quantize_onnx(str(fp32), str(tmp_path / "x.onnx"), [], ops="gemm")


def _int8_folder(tmp_path, accepted: bool):
    fold = tmp_path / "model" / "fold_0"
    fold.mkdir(parents=True)
    checkpoint = fold / "checkpoint_final.pth"
    checkpoint.write_bytes(b"weights")
    path = int8_path(str(tmp_path / "model"), 0)
    open(path, "wb").write(b"onnx")
    json.dump({"accepted": accepted, "dice_drop": 0.001 if accepted else 0.02, "max_drop": 0.005,
               "checkpoint": checkpoint_stamp(str(checkpoint))}, open(report_path(path), "w"))
    return tmp_path / "model", checkpoint, path


def test_predict_int8_runs_only_an_accepted_model_of_the_current_checkpoint(tmp_path):
    folder, checkpoint, path = _int8_folder(tmp_path / "a", accepted=True)
    assert accepted_int8_model(str(folder), 0) == path
    with pytest.raises(UsageError, match="numbered fold"):
        accepted_int8_model(str(folder), "all")
    os.utime(checkpoint, ns=(0, 0))  # a new training wrote the checkpoint again
    with pytest.raises(UsageError, match="another checkpoint_final.pth .*`nnunet-lk quantize"):
        accepted_int8_model(str(folder), 0)
    folder, _, _ = _int8_folder(tmp_path / "b", accepted=False)
    with pytest.raises(UsageError, match=r"not accepted: .* dropped by 0\.0200 .*limit 0\.005"):
        accepted_int8_model(str(folder), 0)
    with pytest.raises(UsageError, match=r"does not exist: make it with `nnunet-lk quantize .* -f 1`"):
        accepted_int8_model(str(folder), 1)


def test_an_eight_bit_model_warns_on_a_cpu_without_vnni(tmp_path, monkeypatch):
    import nnunet_lk.quantize as quantize
    eight, seven = {"quantisation": {"reduce_range": False}}, {"quantisation": {"reduce_range": True}}
    assert "lacks VNNI" in saturation_warning(eight, False) and "nnunet-lk quantize" in saturation_warning(eight, False)
    assert saturation_warning(eight, True) is None and saturation_warning(eight, None) is None
    assert saturation_warning(seven, False) is None
    folder, _, path = _int8_folder(tmp_path, accepted=True)  # a report from before the choice: 8-bit weights
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: False)
    heard = []
    assert accepted_int8_model(str(folder), 0, log=heard.append) == path
    assert len(heard) == 1 and heard[0].startswith("warning: this INT8 model has 8-bit weights")


def test_int8_flag_needs_an_onnx_engine(tmp_path, capsys):
    folder, _, _ = _int8_folder(tmp_path, accepted=True)
    code = cli_main(["predict", "--engine", "torch", "--int8", "-i", str(tmp_path), "-o", str(tmp_path / "out"),
                     "-m", str(folder), "-f", "0"])
    assert code == 1 and "--int8 runs the fold's accepted INT8 model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_quantize_names_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    with pytest.raises(UsageError, match="splits_final.json does not exist"):
        fold_split("Dataset004_Hippocampus", 0)
    (tmp_path / "Dataset004_Hippocampus").mkdir()
    (tmp_path / "Dataset004_Hippocampus" / "splits_final.json").write_text(
        json.dumps([{"train": ["a", "b"], "val": ["c"]}]))
    assert fold_split("Dataset004_Hippocampus", 0) == {"train": ["a", "b"], "val": ["c"]}
    with pytest.raises(UsageError, match="has 1 folds; fold 3"):
        fold_split("Dataset004_Hippocampus", 3)
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(UsageError, match="nnUNet_preprocessed, which is unset"):
        fold_split("Dataset004_Hippocampus", 0)
    assert cli_main(["quantize", str(tmp_path), "-f", "all"]) == 1
    assert "fold 'all' has no validation cases" in capsys.readouterr().err
