"""The glue between a schedule and nnU-Net's loss objects."""
from __future__ import annotations

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from .schedules import LossWeights


class StrictDeepSupervisionWrapper(DeepSupervisionWrapper):
    """nnU-Net's wrapper zips outputs with targets, so a network with too few outputs silently drops
    scales. This one insists the counts match."""

    def forward(self, *args):
        lengths = {len(a) for a in args}
        if len(lengths) != 1:
            raise RuntimeError(f"deep supervision: the network returned {len(args[0])} outputs but there are "
                               f"{len(args[1])} targets; the trainer's deep-supervision scales must match the "
                               f"network's strides")
        return super().forward(*args)


def compound_loss(loss):
    """The Dice+CE (or Dice+BCE) object inside nnU-Net's optional deep-supervision wrapper."""
    base = getattr(loss, "loss", loss)
    if not (hasattr(base, "weight_dice") and hasattr(base, "weight_ce")):
        raise TypeError(f"{type(base).__name__} has no weight_dice/weight_ce; scheduled weights need nnU-Net's "
                        f"DC_and_CE_loss or DC_and_BCE_loss")
    return base


def apply_loss_weights(loss, weights: LossWeights) -> None:
    base = compound_loss(loss)
    base.weight_dice = float(weights.dice)
    base.weight_ce = float(weights.ce)
