"""LM-Net (Lu, She, Wang, Huang, arXiv 2501.03838, 2025), assembled from the official code
(docs/architectures.md §3.2-3.3; nnU-Net generalisation §5.4).

Level roles for S levels: conv levels 0..S-2 (two ReparamConvs each, levels >= 1 entered through a
strided conv), level S-1 = strided conv only; PyramidPool of all levels -> Global Feature Transformer
= decoder input; skip i = LFT(fusion of conv levels {i-1, i, i+1}); decoder stages add the upsampled
features to the skip and apply two ReparamConvs; 1×1 head = ``decoder.seg_layers[-1]``.

At the official configuration (2D, 3 -> 2 classes, 5 levels, widths 12·2^i, 12 heads) the model has
3,966,566 parameters (3,965,366 without the four relative-position bias tables); the paper's
5.4 M / 4.66 GFLOPs are not reproducible from the code (§3.3).
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

from ..blocks.lmnet import (AdditiveUpStage, GlobalFeatureTransformer, LMNetSkipPathway, LocalFeatureTransformer,
                            MultiLevelSkipFusion, PyramidPoolBottleneck, reparam_conv_pair, strided_conv)
from ..blocks.ops import as_tuple, conv_dim
from .registry import Recipe, register_backbone
from .unet import LKUNet, NetworkConfigError, UNetDecoder, resolve_level_strides


def build_lmnet(conv_op, input_channels: int, num_classes: int, *, strides=None, kernel_sizes=None,
                patch_size=None, deep_supervision=False, levels: int = 5, width: int = 12, heads: int = 12,
                gft_heads: int = 12, na_kernel: int = 3, rel_pos_bias: bool = True,
                checkpoint_attention: bool = True) -> LKUNet:
    """Widths are ``width · 2^i`` (official 12, 24, 48, 96, 192). ``heads`` = neighbourhood-attention
    heads of every LFT (must divide ``width``), ``gft_heads`` = heads of the global attention (must
    divide the pyramid width Σ widths). ``na_kernel``: odd neighbourhood size (official 3; the anisotropy
    rule sets it to 1 on axes the plans give kernel 1). ``rel_pos_bias``: natten's relative-position bias (on in the
    natten API the official code was written against). ``checkpoint_attention`` recomputes the
    neighbourhood attention in backward (saves memory; same results)."""
    dim = conv_dim(conv_op)
    name = f"lmnet({levels} levels)"
    if levels < 2:
        raise NetworkConfigError(f"{name}: LM-Net needs at least 2 levels (one conv level and the strided-conv "
                                 f"bottleneck); set levels >= 2")
    level_strides = resolve_level_strides(name, dim, levels, strides, patch_size)
    n = len(level_strides)
    if n < 2:
        raise NetworkConfigError(f"{name}: the plans give {n} stage(s) but LM-Net needs at least 2 (one conv level "
                                 f"and the bottleneck); use a configuration with n_stages >= 2")
    if width < 2:  # the squeeze-excitation of the 2·width expansion needs 2·width / 4 >= 1 channels
        raise NetworkConfigError(f"{name}: width {width} is too small; use width >= 2 (official: 12)")
    if width % heads:
        raise NetworkConfigError(f"{name}: width {width} cannot be split into {heads} neighbourhood-attention heads; "
                                 f"use a width that is a multiple of heads={heads} (official: width=12, heads=12) "
                                 f"or change heads to a divisor of {width}")
    widths = [width * 2 ** i for i in range(n)]
    if sum(widths) % gft_heads:
        raise NetworkConfigError(f"{name}: the pyramid-pooled bottleneck has {sum(widths)} channels, which "
                                 f"gft_heads={gft_heads} does not divide; set gft_heads to a divisor of {sum(widths)}")
    plan_kernels = [as_tuple(k, dim) for k in kernel_sizes[:n]] if kernel_sizes is not None else [None] * n

    encoder = [reparam_conv_pair(conv_op, input_channels, widths[0], plan_kernels[0])]
    for i in range(1, n):
        down = strided_conv(conv_op, widths[i - 1], widths[i], level_strides[i], plan_kernels[i])
        if i < n - 1:
            encoder.append(nn.Sequential(OrderedDict(
                down=down, blocks=reparam_conv_pair(conv_op, widths[i], widths[i], plan_kernels[i]))))
        else:  # the bottleneck level has no conv block (official down4)
            encoder.append(nn.Sequential(OrderedDict(down=down)))

    bottleneck = PyramidPoolBottleneck(GlobalFeatureTransformer(conv_op, sum(widths), widths[-1], gft_heads,
                                                                plan_kernels[-1]))
    conv_levels = n - 1
    fusions, transformers = [], []
    for i in range(conv_levels):
        fusions.append(MultiLevelSkipFusion(
            conv_op, widths[i],
            lower_channels=widths[i - 1] if i > 0 else None,
            upper_channels=widths[i + 1] if i + 1 < conv_levels else None,
            lower_stride=level_strides[i] if i > 0 else None, plan_kernel=plan_kernels[i]))
        transformers.append(LocalFeatureTransformer(conv_op, widths[i], heads, na_kernel, plan_kernels[i],
                                                    rel_pos_bias=rel_pos_bias, checkpoint=checkpoint_attention))
    skips = LMNetSkipPathway(fusions, transformers)

    stages = [AdditiveUpStage(conv_op, widths[i + 1], widths[i], plan_kernels[i]) for i in reversed(range(n - 1))]
    decoder = UNetDecoder(stages, [widths[i] for i in reversed(range(n - 1))], conv_op, num_classes,
                          deep_supervision=deep_supervision)
    # the stride-2 convs round up and the x2 upsamplings then mismatch: pad inside to the total stride
    return LKUNet(encoder, decoder, level_strides, skip_fusion=skips, bottleneck=bottleneck, backbone="lmnet",
                  cpu_channels_last=True)  # bench --variants: train step 2D 1.2x, 3D 1.6x faster (README)


# AdamW lr 1e-3, wd 1e-4, cosine annealing to 1e-6 over the run (official code, 2D; the same in 3D;
# docs/architectures.md §6.4)
PAPER_RECIPE = Recipe("adamw", 1e-3, 1e-4, "cosine", min_lr=1e-6,
                      source="LM-Net official code: AdamW lr 1e-3, wd 1e-4, CosineAnnealing(T_max = all epochs, "
                             "eta_min 1e-6)")
register_backbone(
    "lmnet", build_lmnet, trainer="LMNet", dims=(2, 3), paper_recipes={2: PAPER_RECIPE, 3: PAPER_RECIPE},
    paper="LM-Net, Lu, She, Wang, Huang, arXiv 2501.03838, 2025 (code: Asunatan/LM-Net)",
    description="LM-Net: ReparamConv encoder/decoder, pyramid-pooled global transformer bottleneck, fused "
                "multi-level skips with neighbourhood-attention transformers (3,966,566 params at 2D 3->2)")
