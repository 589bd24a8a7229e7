"""Engines for nnU-Net's own predictor on a CPU: the predictor keeps preprocessing, sliding window, Gaussian
weighting, mirroring, resampling and export; only the network's forward changes.

- ``torch``: eager PyTorch, as ``nnUNetv2_predict -device cpu`` runs it.
- ``compile``: torch.compile (inductor), nnU-Net's own switch (``nnUNet_compile``).
- ``onnxruntime``: the fold exported to ONNX (``nnunet-lk export``), run by ONNX Runtime.
- ``openvino``: the same ONNX model compiled by OpenVINO's runtime for the CPU, in fp32.

Works for any model folder nnU-Net can predict with: every nnunet-lk backbone and stock nnU-Net's own networks.
An ONNX engine without ``--onnx`` exports the fold once, next to its checkpoint (``fold_F/model.onnx``, checked
against PyTorch as ``nnunet-lk export`` checks it), and reuses it afterwards (``export.fold_export``).

``nnUNetPredictor`` is initialised from the model folder as usual and, for the ONNX engines, its ``network``
replaced by a stand-in (torch in/out, the runtime inside), so preprocessing, sliding window, mirroring,
resampling and export are nnU-Net's own."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional, Sequence

import torch
import torch.nn as nn

from .checkpoints import read_checkpoint
from .errors import ExportError
from .export import fold_export, ort_session, patch_model_for
from .extras import require_extra
from .model_folder import checkpoint_trainer_class, fold_folder, nnunet_compile

ENGINES = ("torch", "compile", "onnxruntime", "openvino")
ONNX_ENGINES = ("onnxruntime", "openvino")
EXTRA_OF = {"onnxruntime": "export", "openvino": "openvino"}


class OnnxRuntimeNetwork(nn.Module):
    """Stands in for ``nnUNetPredictor.network``: torch tensor in, torch tensor out, onnxruntime inside.

    The predictor calls ``load_state_dict`` once per fold and ``.to(device)``/``.eval()``; the weights
    live in the ONNX file, so loading is a no-op (the predictor is given exactly one placeholder fold).

    ``input_shape``: the shape the predictor feeds (batch 1, the plans' patch). A session for that shape alone
    folds every shape computation of the graph into constants (LM-Net: 754 nodes -> 402, 12% faster per
    patch), on the export's patch model where the sidecar names one; any other shape goes to a general session,
    made when first needed."""

    def __init__(self, onnx_path: str, threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None):
        super().__init__()
        self.onnx_path, self.threads = onnx_path, threads
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.session = ort_session(patch_model_for(onnx_path, input_shape) or onnx_path, threads, self.input_shape)
        self.input_name = self.session.get_inputs()[0].name
        self._general = None if self.input_shape is not None else self.session

    @property
    def input_channels(self) -> Optional[int]:
        channels = self.session.get_inputs()[0].shape[1]
        return channels if isinstance(channels, int) else None

    def load_state_dict(self, state_dict=None, strict: bool = True, assign: bool = False):
        return None

    def session_for(self, shape: Sequence[int]):
        if tuple(shape) == self.input_shape:
            return self.session
        if self._general is None:
            self._general = ort_session(self.onnx_path, self.threads)
        return self._general

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        out = self.session_for(array.shape).run(None, {self.input_name: array})[0]
        return torch.from_numpy(out).to(x.device)


def onnx_predictor(results_folder: str, onnx_path: str, fold, checkpoint_name: str = "checkpoint_final.pth",
                   use_mirroring: bool = True, tile_step_size: float = 0.5, threads: Optional[int] = None,
                   verbose: bool = False, network_class=None):
    """An ``nnUNetPredictor`` set up from the model folder, whose network runs the ONNX model (``network_class``:
    the runtime's stand-in for the network, onnxruntime's by default)."""
    if network_class is None:
        require_extra("export", "nnunet-lk predict-onnx")
        network_class = OnnxRuntimeNetwork
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    fold_name = fold if fold == "all" else int(fold)
    path = os.path.join(fold_folder(results_folder, fold_name), checkpoint_name)
    if os.path.isfile(path):  # clear errors for a truncated/foreign file or an unknown trainer before nnU-Net's
        checkpoint_trainer_class(read_checkpoint(path)["trainer_name"], path)
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=verbose,
                                verbose_preprocessing=False, allow_tqdm=False)
    # nothing to compile: the network will be the ONNX runtime
    with nnunet_compile(False), contextlib.redirect_stdout(sys.stderr):
        predictor.initialize_from_trained_model_folder(results_folder, (fold_name,), checkpoint_name)
    expected = _n_in(predictor)
    # every window nnU-Net's sliding window feeds has this shape (smaller images are padded to the patch)
    network = network_class(onnx_path, threads, input_shape=(1, expected, *predictor.configuration_manager.patch_size))
    channels = network.input_channels
    if channels is not None and channels != expected:
        raise ExportError(f"{onnx_path} takes {channels} input channels but {results_folder} expects {expected}: "
                          f"export this model folder again (nnunet-lk export)")
    predictor.network = network
    predictor.list_of_parameters = [None]  # one "fold": the ONNX model
    return predictor


def _n_in(predictor) -> int:
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    return determine_num_input_channels(predictor.plans_manager, predictor.configuration_manager,
                                        predictor.dataset_json)


class OpenVinoNetwork(nn.Module):
    """Stands in for ``nnUNetPredictor.network`` as ``OnnxRuntimeNetwork`` does, with OpenVINO's runtime
    (CPU plugin, fp32 inference precision: no silent bf16 on CPUs that have it). ``input_shape``: the shape the
    predictor feeds, compiled as a static model (LM-Net 1.7x faster per patch than the dynamic one), from the
    export's patch model where the sidecar names one; any other shape goes to the dynamic model, compiled when
    first needed."""

    def __init__(self, onnx_path: str, threads: Optional[int] = None, input_shape: Optional[Sequence[int]] = None):
        super().__init__()
        import openvino as ov
        self.config = {"INFERENCE_PRECISION_HINT": "f32"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = int(threads)
        self.onnx_path = onnx_path
        self.core = ov.Core()
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        model = self.core.read_model(patch_model_for(onnx_path, input_shape) or onnx_path)
        if self.input_shape is not None:
            try:
                model.reshape({model.input(0).get_any_name(): list(self.input_shape)})
            except RuntimeError:  # a graph OpenVINO cannot make static: every shape runs on the dynamic model
                model, self.input_shape = self.core.read_model(onnx_path), None
        self.compiled = self.core.compile_model(model, "CPU", self.config)
        self.request = self.compiled.create_infer_request()
        self._general = None if self.input_shape is not None else self.request

    @property
    def input_channels(self) -> Optional[int]:
        channels = self.compiled.input(0).get_partial_shape()[1]
        return channels.get_length() if channels.is_static else None

    def load_state_dict(self, state_dict=None, strict: bool = True, assign: bool = False):
        return None

    def request_for(self, shape: Sequence[int]):
        if tuple(shape) == self.input_shape:
            return self.request
        if self._general is None:
            self._general = self.core.compile_model(self.onnx_path, "CPU", self.config).create_infer_request()
        return self._general

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().to("cpu", torch.float32).contiguous().numpy()
        request = self.request_for(array.shape)
        out = request.infer({0: array})[0]
        return torch.from_numpy(out.copy()).to(x.device)


def engine_predictor(results_folder: str, fold, engine: str, onnx_path: Optional[str] = None,
                     checkpoint_name: str = "checkpoint_final.pth", use_mirroring: bool = True,
                     tile_step_size: float = 0.5, threads: Optional[int] = None, verbose: bool = False, log=print):
    """An ``nnUNetPredictor`` for ``results_folder``'s ``fold`` whose network runs on ``engine``."""
    from .errors import UsageError
    if engine not in ENGINES:
        raise UsageError(f"--engine {engine!r}: choose one of {', '.join(ENGINES)}")
    fold = fold if fold == "all" else int(fold)
    if engine in ONNX_ENGINES:
        require_extra(EXTRA_OF[engine], f"nnunet-lk predict --engine {engine}")
        require_extra("export", f"nnunet-lk predict --engine {engine}")
        if onnx_path is None:
            onnx_path = fold_export(results_folder, fold, checkpoint_name, f"for --engine {engine}", log=log)
        return onnx_predictor(results_folder, onnx_path, fold, checkpoint_name=checkpoint_name,
                              use_mirroring=use_mirroring, tile_step_size=tile_step_size, threads=threads,
                              verbose=verbose, network_class=OpenVinoNetwork if engine == "openvino" else None)
    return _torch_predictor(results_folder, fold, engine == "compile", checkpoint_name, use_mirroring,
                            tile_step_size, threads, verbose)


def _torch_predictor(results_folder: str, fold, compile_network: bool, checkpoint_name: str, use_mirroring: bool,
                     tile_step_size: float, threads: Optional[int], verbose: bool):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=False, device=torch.device("cpu"), verbose=verbose,
                                verbose_preprocessing=False, allow_tqdm=False)
    with nnunet_compile(compile_network), contextlib.redirect_stdout(sys.stderr):
        predictor.initialize_from_trained_model_folder(results_folder, (fold,), checkpoint_name)
    if threads:
        torch.set_num_threads(int(threads))  # after nnU-Net's and our trainers' own setting
    return predictor
