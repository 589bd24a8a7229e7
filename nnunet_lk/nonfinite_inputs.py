"""Input images with NaN or Inf voxels, found before ``nnunet-lk predict-onnx`` predicts anything.

nnU-Net does not check for them. Formats that keep NaN (NRRD, MHA; SimpleITK reads NaN in NIfTI as 0)
reach its z-score normalisation, whose mean and standard deviation over the image become NaN: every voxel
of the case turns NaN, the logits too, and the saved segmentation is all background, with exit status 0.
The images are read with the reader the plans name, as nnU-Net's preprocessing reads them.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np

from .errors import NonFiniteInputError
from .nnunet_io import cases_in_folder


def non_finite_voxels(folder: str, file_ending: str, reader, skip=()) -> Dict[str, List[Tuple[str, int, int]]]:
    """case id -> [(file name, non-finite voxels, voxels)] for each channel file that has any (cases in
    ``skip`` are not read)."""
    found = {}
    for case, files in cases_in_folder(folder, file_ending).items():
        if case in skip:
            continue
        bad = []
        for path in files:
            image, _ = reader.read_images([path])
            count = int(image.size - np.count_nonzero(np.isfinite(image)))
            if count:
                bad.append((os.path.basename(path), count, int(image.size)))
        if bad:
            found[case] = bad
    return found


def refuse_non_finite_inputs(folder: str, predictor, skip=()) -> None:
    """Raise ``NonFiniteInputError`` naming every case of ``folder`` with NaN/Inf voxels (nothing is written);
    cases in ``skip`` (already refused for another reason) are not read."""
    if not os.path.isdir(folder):
        return  # nnU-Net's predictor reports a missing input folder itself
    file_ending = predictor.dataset_json["file_ending"]
    reader = predictor.plans_manager.image_reader_writer_class()
    found = non_finite_voxels(folder, file_ending, reader, skip)
    if not found:
        return
    total = len(cases_in_folder(folder, file_ending))
    listed = "; ".join(f"{case}: " + ", ".join(f"{name} has {count:,} of {size:,} voxels NaN/Inf"
                                               for name, count, size in files)
                       for case, files in list(found.items())[:10])
    more = f"; and {len(found) - 10} more" if len(found) > 10 else ""
    raise NonFiniteInputError(
        f"{len(found)} of {total} input cases in {folder} contain non-finite values (NaN/Inf): {listed}{more}. "
        f"nnU-Net does not check for them: with its z-score normalisation one NaN voxel turns the whole case into "
        f"NaN logits and an all-background segmentation. Replace them (e.g. with 0 or the image's minimum) or move "
        f"these cases out of -i. Nothing was predicted.")
