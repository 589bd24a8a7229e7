"""A fake nnU-Net model folder (Hippocampus plans, a tiny DLKUNet-S, a checkpoint in nnU-Net's own format),
for tests of what reads trained models: export, predict-onnx, the stock predictor's error hints."""
import json
from pathlib import Path

import torch
import torch.nn as nn

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LABELS = {"background": 0, "Anterior": 1, "Posterior": 2}


def randomise_norm_statistics(net: nn.Module, seed: int = 0):
    """Non-trivial BN statistics, as a trained network has, so that folding and export are really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) * 0.2 - 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return net


def fake_plans(width=8):
    plans = json.loads((FIXTURES / "hippocampus_plans.json").read_text())
    plans["configurations"]["2d"]["nnunet_lk"] = {"dlkunet_s": {"width": width}}
    return plans


def fake_dataset_json():
    return {"channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": 4, "file_ending": ".nii.gz"}


def save_checkpoint(path, network, plans, trainer_name, configuration="2d", fold=0):
    """nnU-Net's checkpoint format (nnUNetTrainer.save_checkpoint)."""
    torch.save({"network_weights": network.state_dict(), "optimizer_state": {}, "grad_scaler_state": None,
                "logging": {}, "_best_ema": None, "current_epoch": 3,
                "init_args": {"plans": plans, "configuration": configuration, "fold": fold,
                              "dataset_json": fake_dataset_json(), "device": torch.device("cpu")},
                "trainer_name": trainer_name, "inference_allowed_mirroring_axes": (0, 1)}, path)


def make_model_folder(root: Path, trainer_name: str, plans: dict, network: nn.Module, configuration="2d") -> Path:
    folder = root / plans["dataset_name"] / f"{trainer_name}__{plans['plans_name']}__{configuration}"
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(fake_dataset_json()))
    save_checkpoint(folder / "fold_0" / "checkpoint_final.pth", network, plans, trainer_name, configuration)
    return folder


def dlkunet_s_network(plans, width=8, seed=0):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunet_lk.training.trainers import nnUNetTrainerDLKUNetS
    pm = PlansManager(plans)
    torch.manual_seed(seed)
    # saved as training saves it: deep supervision on
    net = randomise_norm_statistics(
        nnUNetTrainerDLKUNetS.build_network_architecture(pm, pm.get_configuration("2d"), 1, 3, True), seed)
    # Untrained logits are tiny (~1e-3) and favour one class; scale and centre the final head on z-scored
    # input so that every class wins somewhere with clear margins and the label comparison means something.
    net.eval()
    head = net.decoder.seg_layers[-1]
    x = torch.randn(4, 1, 56, 40, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = net(x)[0]
        scale = 1.0 / logits.std(dim=(0, 2, 3))
        head.weight *= scale.reshape(-1, *[1] * (head.weight.dim() - 1))
        head.bias *= scale
        head.bias -= net(x)[0].mean(dim=(0, 2, 3))
    return net.train()
