"""Backbones. Importing this package imports every module in it, so each backbone module registers itself
(``register_backbone``): a new backbone is a module here (and its blocks), nothing else."""
import importlib
import pkgutil

from .registry import BackboneSpec, Recipe, build_backbone, get_backbone, list_backbones, register_backbone
from .unet import count_parameters, LKUNet, NetworkConfigError, UNetDecoder, resolve_level_strides

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["count_parameters", "BackboneSpec", "Recipe", "build_backbone", "get_backbone", "list_backbones",
           "register_backbone", "LKUNet", "NetworkConfigError", "UNetDecoder", "resolve_level_strides"]
