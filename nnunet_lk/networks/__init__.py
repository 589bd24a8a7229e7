"""Backbones. Importing this package registers every backbone module listed below."""
from .registry import BackboneSpec, build_backbone, get_backbone, list_backbones, register_backbone
from .unet import count_parameters, LKUNet, NetworkConfigError, UNetDecoder, resolve_level_strides
from . import dlkunet  # noqa: F401  (registers dlkunet_s/m/l)
from . import lmnet  # noqa: F401  (registers lmnet)
from . import lgmsnet  # noqa: F401  (registers lgmsnet, 2D and 3D)
from . import mslkseg  # noqa: F401  (registers mslkseg)

__all__ = ["count_parameters", "BackboneSpec", "build_backbone", "get_backbone", "list_backbones", "register_backbone", "LKUNet",
           "NetworkConfigError", "UNetDecoder", "resolve_level_strides"]
