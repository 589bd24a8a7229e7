"""Per-case metrics: Dice from nnU-Net's validation summary, HD95 and normalised surface Dice computed with
MONAI from the validation predictions against the ground truth, both read with the plans' image reader (in
nnU-Net's axis order with its spacing, so distances are physical, e.g. mm).

Conventions [ASSUMED, stated in every report]: a class absent from both prediction and reference has no
HD95/NSD (NaN, left out of means, as nnU-Net does for Dice); a class present in only one of them gets HD95 =
the image's physical diagonal (the worst possible distance, so a miss is penalised rather than dropped) and
NSD = 0."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np

from .results import FoldRun, read_validation_summary


def _class_masks(seg: np.ndarray, key: str) -> np.ndarray:
    if key.startswith("("):
        labels = [int(v) for v in key.strip("()").split(",") if v.strip()]
        return np.isin(seg, labels)
    return seg == int(key)


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], class_keys: Sequence[str],
                    nsd_tolerance: float) -> Dict[str, Dict[str, float]]:
    """{class key: {"HD95": mm, "NSD": fraction}} with MONAI, in physical spacing. Arrays in nnU-Net's
    reader layout (1, *spatial) or (*spatial); axes of length 1 (2D images stored as 3D) are dropped."""
    import torch

    from ..extras import require_extra
    require_extra("metrics", "HD95 and normalised surface Dice (nnunet-lk ablate)")
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from the reference's {ref.shape}")
    spacing = [float(s) for s in spacing]
    if pred.ndim == len(spacing) + 1:
        pred, ref = pred[0], ref[0]
    keep = [a for a, n in enumerate(pred.shape) if n > 1]
    pred, ref = pred.squeeze(), ref.squeeze()
    spacing = [spacing[a] for a in keep]
    if pred.ndim not in (2, 3):
        raise ValueError(f"surface metrics need 2D or 3D images, got shape {pred.shape}")
    diagonal = float(np.sqrt(sum((n * s) ** 2 for n, s in zip(pred.shape, spacing))))
    out = {}
    for key in class_keys:
        p, r = _class_masks(pred, key), _class_masks(ref, key)
        if not p.any() and not r.any():
            out[key] = {"HD95": math.nan, "NSD": math.nan}
            continue
        if not p.any() or not r.any():
            out[key] = {"HD95": diagonal, "NSD": 0.0}
            continue
        pt = torch.from_numpy(p)[None, None].float()
        rt = torch.from_numpy(r)[None, None].float()
        hd = compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=spacing)
        nsd = compute_surface_dice(pt, rt, class_thresholds=[nsd_tolerance], include_background=True,
                                   spacing=spacing)
        out[key] = {"HD95": float(hd.item()), "NSD": float(nsd.item())}
    return out


def fold_case_metrics(fold: FoldRun, plans: dict, dataset_json: dict, gt_folder: Path, nsd_tolerance: float,
                      log=print) -> List[dict]:
    """One row per (case, class): Dice from nnU-Net's summary, HD95/NSD from the prediction files."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    file_ending = dataset_json["file_ending"]
    dice = read_validation_summary(fold, file_ending)
    reader = PlansManager(plans).image_reader_writer_class()
    rows = []
    for case, per_class in sorted(dice.items()):
        keys = [k for k in per_class if k not in ("0", "background")]
        pred_file = fold.path / "validation" / f"{case}{file_ending}"
        ref_file = gt_folder / f"{case}{file_ending}"
        surface = {}
        if pred_file.is_file() and ref_file.is_file():
            pred, _ = reader.read_seg(str(pred_file))
            ref, props = reader.read_seg(str(ref_file))
            surface = surface_metrics(pred, ref, props["spacing"], keys, nsd_tolerance)
        else:
            log(f"  warning: {fold.trainer} fold {fold.fold} {case}: "
                f"{pred_file if not pred_file.is_file() else ref_file} missing; no HD95/NSD for this case")
        for key in keys:
            rows.append({"trainer": fold.trainer, "fold": fold.fold, "case": case, "class": key,
                         "Dice": per_class[key], "HD95": surface.get(key, {}).get("HD95", math.nan),
                         "NSD": surface.get(key, {}).get("NSD", math.nan)})
    return rows
