"""A backbone defined outside the package, in one module: what a new backbone needs (its builder and blocks, and
its registration). Imported in a subprocess by the trainer tests; never in the test process itself, so the
contract suite's list of backbones stays the shipped one."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_lk.blocks.ops import conv_dim
from nnunet_lk.networks import Recipe, register_backbone
from nnunet_lk.networks.unet import LKUNet, UNetDecoder, resolve_level_strides


class ToyUp(nn.Module):
    """Upsample to the skip's size, concatenate, one 3x3 conv."""

    def __init__(self, conv_op, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.conv = conv_op(in_channels + skip_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[2:], mode="nearest")
        return torch.relu(self.conv(torch.cat([x, skip], dim=1)))


def build_toy(conv_op, input_channels: int, num_classes: int, *, strides=None, kernel_sizes=None, patch_size=None,
              deep_supervision=False, width: int = 4, levels: int = 3) -> LKUNet:
    level_strides = resolve_level_strides("toy", conv_dim(conv_op), levels, strides, patch_size)
    widths = [width * 2 ** i for i in range(len(level_strides))]
    encoder = [nn.Sequential(conv_op(cin, w, kernel_size=3, stride=s, padding=1), nn.ReLU())
               for cin, w, s in zip([input_channels] + widths[:-1], widths, level_strides)]
    levels_up = list(reversed(range(len(widths) - 1)))
    decoder = UNetDecoder([ToyUp(conv_op, widths[l + 1], widths[l], widths[l]) for l in levels_up],
                          [widths[l] for l in levels_up], conv_op, num_classes, deep_supervision)
    return LKUNet(encoder, decoder, level_strides, backbone="toy")


register_backbone("toy", build_toy, trainer="Toy", dims=(2,), description="a toy backbone for the tests",
                  paper_recipes={2: Recipe("adam", 1e-3, 0.0, "poly", source="none: a test")})
