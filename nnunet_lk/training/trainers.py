"""Every nnunet-lk trainer, generated from the backbone registry: none is written by hand.

- The plain trainer ``nnUNetTrainer<trainer>`` of each registered backbone (``BackboneSpec.trainer``): the
  sigmoid "dynamic" loss schedule (paper eqs. 12-13) and the backbone's default recipe: the optimiser and
  learning-rate schedule of its paper or official code where one is published (``BackboneSpec.paper_recipes``),
  else nnU-Net's (``recipes.default_recipe``).
- Loss variants for ablation: ``_PhaseLoss`` (paper eq. 11) and ``_ConstLoss`` (nnU-Net's 1:1).
- Recipe variants, for the backbones with a paper recipe: ``_PaperRecipe`` and ``_nnUNetRecipe`` name the recipe
  explicitly (``_nnUNetRecipe`` is what the plain trainers trained with before they defaulted to the paper's);
  each combines with each loss variant (``_nnUNetRecipe_PhaseLoss``).

nnU-Net finds trainers by name in the modules under nnUNet_extTrainer (``trainers/``, which re-exports these)
and pickles them by module and name: the classes live in this module's namespace. A backbone registered after
this module was imported (a plug-in module) gets its trainers on first lookup (module ``__getattr__``).

Short budgets: set NNUNET_LK_EPOCHS / NNUNET_LK_ITERATIONS (see README)."""
from typing import Dict

from ..networks import BackboneSpec, get_backbone, list_backbones
from .base import nnUNetTrainerLK

LOSS_VARIANTS = {"": {}, "_PhaseLoss": {"loss_schedule": "phase"}, "_ConstLoss": {"loss_schedule": "constant"}}
RECIPE_VARIANTS = {"": {}, "_PaperRecipe": {"recipe": "paper"}, "_nnUNetRecipe": {"recipe": "nnunet"}}


def _make(name: str, base: type, attributes: dict) -> type:
    # __module__ / __qualname__: nnU-Net finds and pickles trainers by module and name
    return type(name, (base,), {**attributes, "__module__": __name__, "__qualname__": name})


def trainers_of(spec: BackboneSpec) -> Dict[str, type]:
    """Name -> class: the backbone's plain trainer and every (recipe, loss) variant it has."""
    plain = _make(spec.trainer_name, nnUNetTrainerLK, {"backbone": spec.name})
    made = {plain.__name__: plain}
    for recipe_suffix, recipe_attributes in RECIPE_VARIANTS.items():
        if recipe_attributes and not spec.paper_recipes:
            continue  # MS-LKSeg: no recipe published, none invented
        for loss_suffix, loss_attributes in LOSS_VARIANTS.items():
            name = plain.__name__ + recipe_suffix + loss_suffix
            if name != plain.__name__:
                made[name] = _make(name, plain, {**recipe_attributes, **loss_attributes})
    return made


def _generate() -> None:
    """Add the trainers of every registered backbone not yet here to this module's namespace."""
    for backbone in list_backbones():
        spec = get_backbone(backbone)
        if spec.trainer_name not in globals():
            globals().update(trainers_of(spec))


_generate()


def __getattr__(name: str):
    """A trainer of a backbone registered after import (nnU-Net's lookup asks with hasattr/getattr)."""
    if name.startswith("nnUNetTrainer"):
        _generate()
        if name in globals():
            return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def all_trainers() -> dict:
    """Name -> class for every concrete trainer defined here."""
    _generate()
    return {name: obj for name, obj in globals().items()
            if isinstance(obj, type) and issubclass(obj, nnUNetTrainerLK) and obj.backbone is not None}


def plain_trainers() -> Dict[str, type]:
    """Backbone name -> its plain trainer."""
    return {cls.backbone: cls for name, cls in all_trainers().items() if name == get_backbone(cls.backbone).trainer_name}


__all__ = sorted(all_trainers())
