"""One training step as ``nnUNetTrainer.train_step`` runs it, built once for every device: forward with deep
supervision, nnU-Net's Dice+CE loss with its deep-supervision weights, backward, clipping at 12, SGD (Nesterov,
momentum 0.99). ``bench`` times and measures it; the memory estimate runs it on the ``meta`` device."""
from __future__ import annotations

import contextlib
from typing import Callable, List, NamedTuple, Sequence

import numpy as np
import torch


def as_list(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (list, tuple)) else [out]


def nnunet_loss(n_outputs: int, batch_dice: bool):
    """nnU-Net's default loss for ``n_outputs`` deep-supervision outputs (its trainer's ``_build_loss``)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    loss = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                          weight_ce=1, weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    if n_outputs == 1:
        return lambda outputs, targets: loss(outputs[0], targets[0])
    weights = np.array([1 / 2 ** i for i in range(n_outputs)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


class TrainStep(NamedTuple):
    run: Callable[[], None]
    optimizer: torch.optim.Optimizer
    inputs: List[torch.Tensor]  # the batch and its targets: on the device before the step, as nnU-Net's loader puts them


def output_shapes(net, n_in: int, patch: Sequence[int], device) -> List[torch.Size]:
    """Spatial shapes of the deep-supervision outputs (nnU-Net downsamples the targets to these)."""
    with torch.no_grad():
        return [o.shape[2:] for o in as_list(net(torch.zeros(1, n_in, *patch, device=device)))]


def make_train_step(net, n_in: int, n_out: int, patch: Sequence[int], batch: int, *, batch_dice: bool,
                    device, cuda_amp: bool = False, autocast: Callable = contextlib.nullcontext) -> TrainStep:
    """``net`` in training mode with deep supervision on, already on ``device``. ``cuda_amp``: a grad scaler as
    nnU-Net uses on CUDA; ``autocast``: the context the forward runs in."""
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda") if cuda_amp else None
    shapes = output_shapes(net, n_in, patch, device)
    meta = torch.device(device).type == "meta"
    data = torch.empty(batch, n_in, *patch, device=device) if meta else torch.randn(batch, n_in, *patch, device=device)
    targets = [torch.zeros(batch, 1, *s, device=device) if meta else
               torch.randint(0, n_out, (batch, 1, *s), device=device).float() for s in shapes]
    loss_fn = nnunet_loss(len(shapes), batch_dice)

    def run():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(as_list(net(data)), targets)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            optimizer.step()

    return TrainStep(run, optimizer, [data, *targets])
