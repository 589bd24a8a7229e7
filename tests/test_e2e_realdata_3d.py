"""Real data, stock CLIs, 3d_fullres: as test_e2e_realdata.py (its own file so that the two pytest-xdist
workers train at once), on a Hippocampus subset with CPU-sized 3D plans (patch 24x32x24, batch 2, the lite_3d
preset). CI trains MS-LKSeg, whose fold nnU-Net's own predictor must run on its fused kernels; `-m full` adds
every other 3D-capable backbone."""
from __future__ import annotations

import pytest

from tests.helpers.realdata import assert_predictor_uses_fused_kernels
from tests.helpers.trained import Run, assert_beats_the_dice_floor

pytestmark = pytest.mark.slow
full = pytest.mark.full

# Calibration as in test_e2e_realdata.py: three unseeded runs, lowest first, then the seeded run the tests make
# (one thread, the fifth session). Unseeded, MS-LKSeg once gave 0.106 (CI, the tenth session): seeded since.
MSLKSEG_3D = Run("hippocampus_3d", "nnUNetTrainerMSLKSeg", 6, 15, 0.12)  # 0.187, 0.447, 0.456; seeded 0.421
# 6 x 15 gave 0.476, 0.511, 0.517, then 0.222 in one CI run (floor 0.26 failed): 8 x 15, recalibrated
LGMSNET_3D = Run("hippocampus_3d", "nnUNetTrainerLGMSNet_nnUNetRecipe", 8, 15, 0.2)  # 0.381, 0.382, 0.487; seeded 0.354
DLKUNET_3D = Run("hippocampus_3d", "nnUNetTrainerDLKUNetM_nnUNetRecipe", 12, 25, 0.24)  # 0.424, 0.477, 0.531; seeded 0.459
LMNET_3D = Run("hippocampus_3d", "nnUNetTrainerLMNet_nnUNetRecipe", 6, 15, 0.24)  # 0.437, 0.561, 0.609; seeded 0.331
RUNS = [MSLKSEG_3D]
FULL_RUNS = [LGMSNET_3D, DLKUNET_3D, LMNET_3D]


@pytest.mark.parametrize("spec", [pytest.param(r, id=r.id) for r in RUNS]
                         + [pytest.param(r, id=r.id, marks=full) for r in FULL_RUNS])
def test_trained_fold_beats_the_dice_floor(trained_fold, spec):
    assert_beats_the_dice_floor(trained_fold(spec))


def test_stock_predictor_runs_the_fused_kernels(trained_fold):
    fold = trained_fold(MSLKSEG_3D)
    assert_predictor_uses_fused_kernels(fold.model, fold.root / "new_cases", fold.env)
