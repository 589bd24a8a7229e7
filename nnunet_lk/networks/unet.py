"""The one U skeleton every backbone is assembled into.

It owns what nnU-Net needs from a network, so each backbone file only supplies its blocks:
- levels and per-axis strides taken from the plans (``resolve_level_strides``),
- padding inside ``forward`` to the size the backbone needs, logits cropped back,
- deep-supervision heads (``decoder.seg_layers``) always built, used only when
  ``decoder.deep_supervision`` is on, outputs highest resolution first,
- ``deep_supervision_scales`` derived from the strides the network really uses,
- ``cpu_channels_last``: on a CPU, run channels-last end to end (input converted once at the entry, conv
  weights once at the first such call): chosen per backbone where oneDNN's channels-last kernels, our
  depthwise op's fast path included, measured faster (``nnunet-lk bench --variants``). Off on other
  devices and while tracing, exporting or compiling.
- ``full_precision``: run in float32 even under autocast (set by the trainer when mixed precision
  makes the loss non-finite); kept in the state dict only when set, so checkpoints carry it to
  ``--c`` and to ``nnUNetv2_predict`` while older checkpoints still load strictly.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..blocks.depthwise_layout import to_channels_last
from ..blocks.ops import as_tuple, set_conv_weight_layout
from ..errors import NetworkConfigError


def resolve_level_strides(name: str, dim: int, n_levels: int, strides=None, patch_size=None) -> List[tuple]:
    """Per-level strides (level 0 = full resolution, stride 1).

    ``strides`` are the plans' ``arch_kwargs['strides']`` (one entry per nnU-Net stage, first all ones)
    or None for the paper's isotropic x2 pyramid. The depth is the backbone's ``n_levels`` but never
    more than the plans allow; the patch must be large enough for the resulting pyramid.
    """
    if strides is None:
        level_strides = [(1,) * dim] + [(2,) * dim] * (n_levels - 1)
    else:
        plan = [as_tuple(s, dim) for s in strides]
        if not plan:
            raise NetworkConfigError(f"{name}: the plans give no strides")
        if any(v != 1 for v in plan[0]):
            raise NetworkConfigError(
                f"{name}: the first plans stride is {list(plan[0])}, but the first level must keep full "
                f"resolution; set architecture.arch_kwargs.strides[0] to {[1] * dim} in the plans")
        level_strides = plan[:min(n_levels, len(plan))]
    if patch_size is not None:
        patch = as_tuple(patch_size, dim)
        cumulative = np.prod(np.array(level_strides), axis=0)
        for axis, (p, c) in enumerate(zip(patch, cumulative)):
            if p < c:
                raise NetworkConfigError(
                    f"{name}: patch_size {list(patch)} is too small for {len(level_strides)} levels with "
                    f"strides {[list(s) for s in level_strides]}: axis {axis} has {p} voxels but is "
                    f"downsampled {int(c)}x. Increase 'patch_size' of this configuration in the plans "
                    f"(e.g. `nnunet-lk plans ... --patch`) or use a variant with fewer levels.")
    return level_strides


def cumulative_strides(level_strides: Sequence[Sequence[int]]) -> List[tuple]:
    return [tuple(int(v) for v in c) for c in np.cumprod(np.array(level_strides), axis=0)]


def pad_end_to_multiple(x: torch.Tensor, multiple: Sequence[int]) -> torch.Tensor:
    """Zero-pad the end of each spatial axis up to a multiple (cropping back is a plain slice)."""
    pad = []
    for size, m in zip(reversed(x.shape[2:]), reversed(tuple(multiple))):
        pad += [0, (-size) % m]
    return F.pad(x, pad) if any(pad) else x


class UNetDecoder(nn.Module):
    """Decoder stages (deepest first) and one 1×1 head per stage.

    ``stages[i](x, skip)`` upsamples ``x`` and merges the skip. Every head is built whether or not
    deep supervision is on, so the state dict is identical either way (nnU-Net predicts with it off
    and loads strictly). ``deep_supervision`` is the attribute nnU-Net's trainer toggles.
    """

    def __init__(self, stages: Sequence[nn.Module], stage_channels: Sequence[int], conv_op, num_classes: int,
                 deep_supervision: bool = False):
        super().__init__()
        if len(stages) != len(stage_channels):
            raise ValueError("one channel count per decoder stage is required")
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(conv_op(c, num_classes, kernel_size=1, bias=True) for c in stage_channels)
        self.deep_supervision = deep_supervision

    def forward(self, x, skips: Sequence[torch.Tensor]):
        if len(skips) != len(self.stages):
            raise RuntimeError(f"decoder has {len(self.stages)} stages but got {len(skips)} skips")
        outputs = []
        for i, stage in enumerate(self.stages):
            x = stage(x, skips[-(i + 1)])
            if self.deep_supervision:
                outputs.append(self.seg_layers[i](x))
        if not self.deep_supervision:
            return [self.seg_layers[-1](x)]
        return outputs[::-1]  # highest resolution first, as nnU-Net's loss expects


class LKUNet(nn.Module):
    """Encoder stages → (skip fusion) → (bottleneck) → decoder → logits.

    ``encoder_stages[l]`` maps level l-1 features to level l (it does its own downsampling by
    ``level_strides[l]``); ``skip_fusion(features)`` returns the skips for levels 0..L-2 (default: the
    encoder features themselves); ``bottleneck(features)`` returns the decoder input (default: the
    deepest features). ``size_multiple`` is what the input is padded to inside ``forward``; by default
    the total stride, so that every deep-supervision output lines up with nnU-Net's targets.
    """

    def __init__(self, encoder_stages: Sequence[nn.Module], decoder: UNetDecoder, level_strides, *,
                 skip_fusion: Optional[nn.Module] = None, bottleneck: Optional[nn.Module] = None,
                 size_multiple: Optional[Sequence[int]] = None, backbone: str = "", cpu_channels_last: bool = False):
        super().__init__()
        if len(encoder_stages) != len(level_strides) or len(decoder.stages) != len(level_strides) - 1:
            raise ValueError("need one encoder stage per level and one decoder stage per level but the deepest")
        self.encoder = nn.ModuleList(encoder_stages)
        self.decoder = decoder
        self.skip_fusion = skip_fusion
        self.bottleneck = bottleneck
        self.level_strides = [tuple(int(v) for v in s) for s in level_strides]
        self.total_stride = cumulative_strides(self.level_strides)[-1]
        self.size_multiple = tuple(size_multiple) if size_multiple is not None else self.total_stride
        self.backbone = backbone
        self.cpu_channels_last = cpu_channels_last
        self._weights_channels_last = False
        self.full_precision = False
        self._register_state_dict_hook(_save_full_precision)
        self._register_load_state_dict_pre_hook(_load_full_precision, with_module=True)

    @property
    def deep_supervision_scales(self) -> List[List[float]]:
        """Scale of each deep-supervision output relative to the input, highest resolution first:
        nnU-Net's ``1 / cumprod(strides)[:-1]`` for the strides this network really uses."""
        return [[1.0 / c for c in cum] for cum in cumulative_strides(self.level_strides)[:-1]]

    def forward_aligned(self, x) -> List[torch.Tensor]:
        """The network on an input already padded to ``size_multiple``: the decoder's outputs, highest
        resolution first (one with deep supervision off). Shape logic-free, so exporters can trace it."""
        features = []
        for stage in self.encoder:
            x = stage(x)
            features.append(x)
        skips = self.skip_fusion(features) if self.skip_fusion is not None else features[:-1]
        x = self.bottleneck(features) if self.bottleneck is not None else features[-1]
        return self.decoder(x, skips)

    def forward(self, x):
        if self.full_precision and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._forward(x.float())
        return self._forward(x)

    def _forward(self, x):
        x = self._entry_layout(x)
        size = x.shape[2:]
        outputs = self.forward_aligned(pad_end_to_multiple(x, self.size_multiple))
        if self.decoder.deep_supervision:
            scales = self.deep_supervision_scales
            return [self._crop(o, size, s) for o, s in zip(outputs, scales)]
        return self._crop(outputs[0], size, [1.0] * len(size))

    def _entry_layout(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting() \
                or torch.onnx.is_in_onnx_export():
            return x  # graphs see the network as written
        wanted = self.cpu_channels_last and x.device.type == "cpu"
        # weights once, at the first such call; never under torch.distributed: DDP's gradient buckets follow
        # the parameters' strides at its construction (the convs then take channels-last input alone)
        weights = wanted and not (torch.distributed.is_available() and torch.distributed.is_initialized())
        if weights != self._weights_channels_last:
            set_conv_weight_layout(self, weights)
            self._weights_channels_last = weights
        return to_channels_last(x) if wanted else x

    @staticmethod
    def _crop(x: torch.Tensor, size, scale) -> torch.Tensor:
        # nnU-Net sizes its deep-supervision targets as round(patch * scale) (batchgeneratorsv2).
        target = [int(round(s * f)) for s, f in zip(size, scale)]
        if list(x.shape[2:]) == target:
            return x
        return x[(...,) + tuple(slice(0, t) for t in target)]


FULL_PRECISION_KEY = "nnunet_lk_full_precision"


def _save_full_precision(module, state_dict, prefix, local_metadata):
    if module.full_precision:
        state_dict[prefix + FULL_PRECISION_KEY] = torch.tensor(True)
    return state_dict


def _load_full_precision(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                         error_msgs):
    # Popped before strict loading looks for unexpected keys; absent (older checkpoints) means off.
    module.full_precision = bool(state_dict.pop(prefix + FULL_PRECISION_KEY, torch.tensor(False)))


def count_parameters(net: nn.Module, deep_supervision_heads: bool = True) -> int:
    """Parameter count. ``deep_supervision_heads=False`` leaves out the auxiliary heads that only deep
    supervision uses (our nnU-Net extension), which is what the papers' counts compare to."""
    total = sum(p.numel() for p in net.parameters())
    heads = getattr(getattr(net, "decoder", None), "seg_layers", None)  # ours and nnU-Net's own decoders
    if not deep_supervision_heads and heads is not None:
        total -= sum(p.numel() for head in list(heads)[:-1] for p in head.parameters())
    return total


__all__ = ["count_parameters", "LKUNet", "UNetDecoder", "NetworkConfigError", "resolve_level_strides", "cumulative_strides",
           "pad_end_to_multiple"]
