"""Every nnunet-lk trainer: one backbone per plain class, and its variants generated from two tables.

- Loss variants for ablation: ``_PhaseLoss`` (paper eq. 11) and ``_ConstLoss`` (nnU-Net's 1:1); the plain
  name uses the sigmoid "dynamic" schedule (paper eqs. 12-13).
- Recipe variant ``_PaperRecipe``: the optimiser and learning-rate schedule of the backbone's paper or
  official code (``recipes.py``), for the backbones whose sources give one; it combines with each loss
  variant (``_PaperRecipe_PhaseLoss``), every combination generated here, none written by hand.

Short budgets: set NNUNET_LK_EPOCHS / NNUNET_LK_ITERATIONS (see README)."""
from .base import nnUNetTrainerLK
from .recipes import has_paper_recipe


class nnUNetTrainerDLKUNetS(nnUNetTrainerLK):
    backbone = "dlkunet_s"


class nnUNetTrainerDLKUNetM(nnUNetTrainerLK):
    backbone = "dlkunet_m"


class nnUNetTrainerDLKUNetL(nnUNetTrainerLK):
    backbone = "dlkunet_l"


class nnUNetTrainerLGMSNet(nnUNetTrainerLK):
    backbone = "lgmsnet"


class nnUNetTrainerMSLKSeg(nnUNetTrainerLK):
    backbone = "mslkseg"


class nnUNetTrainerLMNet(nnUNetTrainerLK):
    backbone = "lmnet"


PLAIN_TRAINERS = (nnUNetTrainerDLKUNetS, nnUNetTrainerDLKUNetM, nnUNetTrainerDLKUNetL, nnUNetTrainerLGMSNet,
                  nnUNetTrainerMSLKSeg, nnUNetTrainerLMNet)
LOSS_VARIANTS = {"": {}, "_PhaseLoss": {"loss_schedule": "phase"}, "_ConstLoss": {"loss_schedule": "constant"}}
RECIPE_VARIANTS = {"": {}, "_PaperRecipe": {"recipe": "paper"}}


def _variants():
    """Name -> class for every (recipe, loss) variant of every plain trainer but the plain one itself."""
    generated = {}
    for plain in PLAIN_TRAINERS:
        for recipe_suffix, recipe_attributes in RECIPE_VARIANTS.items():
            if recipe_attributes and not has_paper_recipe(plain.backbone):
                continue  # MS-LKSeg: no recipe published, none invented
            for loss_suffix, loss_attributes in LOSS_VARIANTS.items():
                name = plain.__name__ + recipe_suffix + loss_suffix
                if name != plain.__name__:
                    # __module__ / __qualname__: nnU-Net finds and pickles trainers by module and name
                    generated[name] = type(name, (plain,), {**recipe_attributes, **loss_attributes,
                                                            "__module__": __name__, "__qualname__": name})
    return generated


globals().update(_variants())


def all_trainers() -> dict:
    """Name -> class for every concrete trainer defined here."""
    return {name: obj for name, obj in globals().items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainerLK) and obj.backbone is not None}


__all__ = sorted(all_trainers())
