"""The engines of `nnunet-lk predict` (nnunet_lk/engines.py) on stock nnU-Net's own 3D networks, plain and residual
encoder: nnU-Net's predictor gives the same logits on the plans' patch whichever engine runs the network, through
the ONNX engines' models specialised to the window's shape and their general ones. (The
label maps of every engine against `nnUNetv2_predict` on real images: tests/test_export.py; INT8:
tests/test_quantize.py.)"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.modelfolder import FIXTURES, make_model_folder

PATCH = [32, 48, 32]  # the export also checks half of it: 2 x 3 x 2 at the bottleneck


def _stock_3d_plans(architecture: str) -> dict:
    plans = json.loads((FIXTURES / "hippocampus_plans.json").read_text())
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"] = PATCH
    kwargs = config["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [4, 8, 8, 8]
    if architecture == "resenc":  # nnU-Net's ResEnc presets: residual blocks in the encoder, plain decoder
        config["architecture"]["network_class_name"] = \
            "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
        kwargs["n_blocks_per_stage"] = [1, 2, 2, 2]
        del kwargs["n_conv_per_stage"]
        kwargs["n_conv_per_stage_decoder"] = [1, 1, 1]
    return copy.deepcopy(plans)


@pytest.mark.parametrize("architecture", ["plain", "resenc"])
def test_onnx_engines_give_torchs_logits_for_stock_3d_networks(tmp_path, architecture):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("openvino")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk.engines import engine_predictor

    plans = _stock_3d_plans(architecture)
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)
    assert type(net).__name__ == {"plain": "PlainConvUNet", "resenc": "ResidualEncoderUNet"}[architecture]
    folder = make_model_folder(tmp_path, "nnUNetTrainer", plans, net, configuration="3d_fullres")
    generator = torch.Generator().manual_seed(1)
    patch = torch.randn(2, 1, *PATCH, generator=generator)
    case = torch.randn(1, PATCH[0] + 9, PATCH[1] + 5, PATCH[2], generator=generator)  # a few sliding windows

    network_logits, window_logits, case_logits = {}, {}, {}
    for engine in ("torch", "onnxruntime", "openvino"):
        predictor = engine_predictor(str(folder), 0, engine, use_mirroring=True, threads=1, log=lambda m: None)
        with torch.no_grad():
            window_logits[engine] = predictor.network(patch[:1]).float().numpy()  # the shape the predictor feeds
            network_logits[engine] = predictor.network(patch).float().numpy()  # any other shape
        case_logits[engine] = predictor.predict_logits_from_preprocessed_data(case).float().numpy()
        if engine == "onnxruntime":  # a session for the window's shape (free dimensions fixed), one for the rest
            assert predictor.network.session.get_inputs()[0].shape == [1, 1, *PATCH]
            assert predictor.network.session_for((2, 1, *PATCH)).get_inputs()[0].shape[0] == "batch"
        elif engine == "openvino":  # a static model for the window's shape, the dynamic one for the rest
            assert list(predictor.network.compiled.input(0).get_partial_shape().to_shape()) == [1, 1, *PATCH]
            assert predictor.network.request_for((2, 1, *PATCH)) is not predictor.network.request
    assert (Path(folder) / "fold_0" / "model.onnx").is_file()  # exported once, then reused by openvino
    reference, whole = network_logits["torch"], case_logits["torch"]
    assert reference.shape == (2, 3, *PATCH) and reference.std() > 0 and whole.shape == (3, *case.shape[1:])
    for engine in ("onnxruntime", "openvino"):
        # the network on the plans' patch: float32 rounding
        for logits, expected in ((network_logits[engine], reference), (window_logits[engine], window_logits["torch"])):
            difference = np.abs(logits - expected).max()
            assert difference <= 1e-4 * max(1.0, np.abs(expected).max()), f"{engine}: {difference:.2e}"
        # the whole sliding window with mirroring. nnU-Net accumulates Gaussian-weighted logits in float16, and at
        # window corners the weights are ~1e-6 (subnormal): there a 1e-5 difference of the network's output shows
        # as up to ~0.1, in a few voxels of the case border. So: the 99.9th percentile, and the labels.
        difference = np.quantile(np.abs(case_logits[engine] - whole), 0.999)
        assert difference <= 4e-3 * max(1.0, np.abs(whole).max()), f"{engine}, case: {difference:.2e}"
        assert (case_logits[engine].argmax(0) == whole.argmax(0)).mean() >= 0.999


def test_openvino_runs_the_dynamic_model_where_it_cannot_be_made_static(tmp_path, monkeypatch):
    pytest.importorskip("onnxruntime")
    ov = pytest.importorskip("openvino")
    from nnunet_lk.engines import OpenVinoNetwork
    from nnunet_lk.export import export_network
    net = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    path = str(tmp_path / "conv.onnx")
    export_network(net, path, 1, [1, 1], [8, 8])

    def refuse(self, shapes):
        raise RuntimeError("cannot make this graph static")
    monkeypatch.setattr(ov.Model, "reshape", refuse)
    network = OpenVinoNetwork(path, 1, input_shape=(1, 1, 8, 8))
    assert network.input_shape is None and network.request_for((1, 1, 8, 8)) is network.request
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(network(x), net(x), atol=1e-5, rtol=1e-5)


def test_onnx_engines_run_the_patch_model_for_the_windows(tmp_path, monkeypatch):
    """A network with a static export form (LM-Net in 3D) also gets a patch model, exported at the one shape the
    sliding window feeds; both ONNX engines run it for that shape and the general model for any other, with
    torch's logits. A later export of a network without one leaves no patch model behind."""
    pytest.importorskip("onnxruntime")
    ov = pytest.importorskip("openvino")
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk import engines, export

    plans = _stock_3d_plans("plain")
    pm = PlansManager(plans)
    torch.manual_seed(0)
    net = nnUNetTrainer.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, 3, True)
    folder = make_model_folder(tmp_path, "nnUNetTrainer", plans, net, configuration="3d_fullres")
    fold = Path(folder) / "fold_0"
    monkeypatch.setattr(export, "has_static_form", lambda network: True)
    opened = []
    ort_session, read_model, compile_model = engines.ort_session, ov.Core.read_model, ov.Core.compile_model
    monkeypatch.setattr(engines, "ort_session", lambda path, *a, **k: opened.append(path) or ort_session(path, *a, **k))
    monkeypatch.setattr(ov.Core, "read_model", lambda self, path, *a: opened.append(path) or read_model(self, path, *a))
    monkeypatch.setattr(ov.Core, "compile_model", lambda self, model, *a: (
        opened.append(model) if isinstance(model, str) else None) or compile_model(self, model, *a))

    window = torch.randn(1, 1, *PATCH, generator=torch.Generator().manual_seed(1))
    batch = torch.cat([window, window])
    with torch.no_grad():
        net.eval()
        net.decoder.deep_supervision = False
        expected = net(window).numpy()
    for engine in ("onnxruntime", "openvino"):
        predictor = engines.engine_predictor(str(folder), 0, engine, use_mirroring=False, threads=1,
                                             log=lambda m: None)
        assert opened[-1] == str(fold / "model.patch.onnx"), (engine, opened)
        with torch.no_grad():
            for x in (window, batch):  # the window's shape, then another (the general model)
                difference = np.abs(predictor.network(x).numpy()[:1] - expected).max()
                assert difference <= 1e-4 * max(1.0, np.abs(expected).max()), f"{engine}: {difference:.2e}"
        assert opened[-1] == str(fold / "model.onnx"), (engine, opened)
    sidecar = json.loads((fold / "model.json").read_text())
    assert sidecar["patch_model"]["file"] == "model.patch.onnx"
    assert sidecar["patch_model"]["input_shape"] == [1, 1, *PATCH]
    import onnx
    graph_input = onnx.load(str(fold / "model.patch.onnx")).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [1, 1, *PATCH]  # every size a constant

    monkeypatch.undo()  # stock nnU-Net's network has no static form: a new export removes the old patch model
    export.export_model_folder(str(folder), 0, str(fold / "model.onnx"), log=lambda m: None)
    assert not (fold / "model.patch.onnx").exists()
    assert "patch_model" not in json.loads((fold / "model.json").read_text())
    assert export.patch_model_for(str(fold / "model.onnx"), [1, 1, *PATCH]) is None
