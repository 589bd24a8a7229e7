import math

import pytest

from nnunet_lk.losses.schedules import (PAPER_STEEPNESS, get_schedule, phase_weights, progress, sigmoid_weights)


def test_progress_is_epoch_over_budget():
    assert progress(0, 1000) == 0.0
    assert progress(500, 1000) == 0.5
    with pytest.raises(ValueError):
        progress(0, 0)


def test_sigmoid_matches_paper_equations_at_400_epochs():
    # Paper eqs. 12-13 with the official k = 0.1 per epoch and x0 = 200 of 400 epochs.
    for epoch in (0, 150, 190, 200, 210, 250, 399):
        s = 1 / (1 + math.exp(-0.1 * (epoch - 200)))
        w = sigmoid_weights(progress(epoch, 400))
        assert w.dice == pytest.approx(0.3 + 0.7 * (1 - s), abs=1e-12)
        assert w.ce == pytest.approx(1 + (0.7 - 1) * (1 - s), abs=1e-12)


def test_sigmoid_endpoints_and_midpoint():
    start, mid, end = sigmoid_weights(0.0), sigmoid_weights(0.5), sigmoid_weights(1.0)
    assert start.dice == pytest.approx(1.0, abs=1e-6) and start.ce == pytest.approx(0.7, abs=1e-6)
    assert mid.dice == pytest.approx(0.65) and mid.ce == pytest.approx(0.85)
    assert end.dice == pytest.approx(0.3, abs=1e-6) and end.ce == pytest.approx(1.0, abs=1e-6)


def test_sigmoid_shape_is_budget_independent():
    # The same progress gives the same weights for a 1000-epoch run and a 10-epoch run.
    assert sigmoid_weights(progress(300, 1000)) == sigmoid_weights(progress(3, 10))
    assert PAPER_STEEPNESS == pytest.approx(40.0)


def test_sigmoid_parameters_are_configurable():
    w = get_schedule("sigmoid", dice_end=0.5, ce_start=0.2, midpoint=0.25, steepness=10)(0.25)
    assert w.dice == pytest.approx(0.75) and w.ce == pytest.approx(0.6)


def test_sigmoid_is_monotonic():
    ws = [sigmoid_weights(t / 100) for t in range(101)]
    assert all(a.dice >= b.dice and a.ce <= b.ce for a, b in zip(ws, ws[1:]))


def test_phase_switches_at_half():
    assert phase_weights(progress(199, 400)) == phase_weights(0.0)
    assert (phase_weights(0.0).dice, phase_weights(0.0).ce) == (0.6, 0.4)
    assert (phase_weights(progress(200, 400)).dice, phase_weights(progress(200, 400)).ce) == (0.7, 0.3)
    assert phase_weights(0.3, switch=0.25).dice == 0.7


def test_constant_is_nnunet_default():
    w = get_schedule("constant")(0.7)
    assert (w.dice, w.ce) == (1.0, 1.0)


def test_unknown_schedule_names_choices():
    with pytest.raises(ValueError, match="sigmoid, phase, constant"):
        get_schedule("cosine")
