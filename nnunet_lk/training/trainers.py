"""Every nnunet-lk trainer: one backbone (and optionally one loss schedule) per class.

Loss variants for ablation: ``_PhaseLoss`` (paper eq. 11) and ``_ConstLoss`` (nnU-Net's 1:1);
the plain name uses the sigmoid "dynamic" schedule (paper eqs. 12-13). Short budgets: set
NNUNET_LK_EPOCHS / NNUNET_LK_ITERATIONS (see README)."""
from .base import nnUNetTrainerLK


class nnUNetTrainerDLKUNetS(nnUNetTrainerLK):
    backbone = "dlkunet_s"


class nnUNetTrainerDLKUNetS_PhaseLoss(nnUNetTrainerDLKUNetS):
    loss_schedule = "phase"


class nnUNetTrainerDLKUNetS_ConstLoss(nnUNetTrainerDLKUNetS):
    loss_schedule = "constant"


class nnUNetTrainerDLKUNetM(nnUNetTrainerLK):
    backbone = "dlkunet_m"


class nnUNetTrainerDLKUNetM_PhaseLoss(nnUNetTrainerDLKUNetM):
    loss_schedule = "phase"


class nnUNetTrainerDLKUNetM_ConstLoss(nnUNetTrainerDLKUNetM):
    loss_schedule = "constant"


class nnUNetTrainerDLKUNetL(nnUNetTrainerLK):
    backbone = "dlkunet_l"


class nnUNetTrainerDLKUNetL_PhaseLoss(nnUNetTrainerDLKUNetL):
    loss_schedule = "phase"


class nnUNetTrainerDLKUNetL_ConstLoss(nnUNetTrainerDLKUNetL):
    loss_schedule = "constant"


class nnUNetTrainerLGMSNet(nnUNetTrainerLK):
    backbone = "lgmsnet"


class nnUNetTrainerLGMSNet_PhaseLoss(nnUNetTrainerLGMSNet):
    loss_schedule = "phase"


class nnUNetTrainerLGMSNet_ConstLoss(nnUNetTrainerLGMSNet):
    loss_schedule = "constant"


class nnUNetTrainerMSLKSeg(nnUNetTrainerLK):
    backbone = "mslkseg"


class nnUNetTrainerMSLKSeg_PhaseLoss(nnUNetTrainerMSLKSeg):
    loss_schedule = "phase"


class nnUNetTrainerMSLKSeg_ConstLoss(nnUNetTrainerMSLKSeg):
    loss_schedule = "constant"


class nnUNetTrainerLMNet(nnUNetTrainerLK):
    backbone = "lmnet"


class nnUNetTrainerLMNet_PhaseLoss(nnUNetTrainerLMNet):
    loss_schedule = "phase"


class nnUNetTrainerLMNet_ConstLoss(nnUNetTrainerLMNet):
    loss_schedule = "constant"


def all_trainers() -> dict:
    """Name -> class for every concrete trainer defined here."""
    return {name: obj for name, obj in globals().items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainerLK) and obj.backbone is not None}


__all__ = sorted(all_trainers())
