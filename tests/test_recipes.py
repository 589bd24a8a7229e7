"""Training recipes (``nnunet_lk/training/recipes.py``): each paper recipe as its sources state it, the
learning rate at given epochs, and nnU-Net's own recipe reproduced exactly."""
import math

import pytest
import torch
from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

from nnunet_lk.errors import NetworkConfigError
from nnunet_lk.training.recipes import (NNUNET, RecipeLRScheduler, default_recipe, has_paper_recipe, learning_rate,
                                        make_optimizer, paper_recipe, resolve_recipe, saved_recipe)


def test_nnunet_recipe_is_nnunets_poly_schedule():
    net = torch.nn.Linear(2, 2)
    ours = make_optimizer(NNUNET, net.parameters())
    stock = torch.optim.SGD(net.parameters(), 1e-2, weight_decay=3e-5, momentum=0.99, nesterov=True)
    assert ours.defaults == stock.defaults
    stock_scheduler = PolyLRScheduler(stock, 1e-2, 1000)
    for epoch in (0, 1, 250, 999):
        stock_scheduler.step(epoch)
        assert learning_rate(NNUNET, epoch, 1000) == pytest.approx(stock.param_groups[0]["lr"], rel=1e-12)


def test_dlkunet_paper_recipe_is_adam_with_the_codes_step_decay():
    recipe = paper_recipe("dlkunet_l", 2)
    opt = make_optimizer(recipe, torch.nn.Linear(2, 2).parameters())
    assert type(opt) is torch.optim.Adam and opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 1e-5
    # the official run: 400 epochs, x0.9 every 20
    assert learning_rate(recipe, 0, 400) == 1e-3
    assert learning_rate(recipe, 19, 400) == 1e-3
    assert learning_rate(recipe, 20, 400) == pytest.approx(0.9e-3)
    assert learning_rate(recipe, 399, 400) == pytest.approx(1e-3 * 0.9 ** 19)
    # the same curve over progress at nnU-Net's 1000 epochs: a step every 50
    assert learning_rate(recipe, 49, 1000) == 1e-3 and learning_rate(recipe, 50, 1000) == pytest.approx(0.9e-3)
    assert paper_recipe("dlkunet_s", 3) == recipe  # one recipe for the family, 3D included


def test_lgmsnet_recipes_differ_by_dimension():
    sgd = paper_recipe("lgmsnet", 2)
    opt = make_optimizer(sgd, torch.nn.Linear(2, 2).parameters())
    assert type(opt) is torch.optim.SGD
    assert (opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"], opt.defaults["nesterov"]) == \
        (0.02, 0.9, 1e-4, False)
    assert learning_rate(sgd, 250, 500) == pytest.approx(0.02 * 0.5 ** 0.9)

    adamw = paper_recipe("lgmsnet", 3)
    assert type(make_optimizer(adamw, torch.nn.Linear(2, 2).parameters())) is torch.optim.AdamW
    # 5000 epochs: linear warm-up over the first 50, then cosine to 0
    assert learning_rate(adamw, 0, 5000) == pytest.approx(1e-3 / 51)
    assert learning_rate(adamw, 49, 5000) == pytest.approx(1e-3 * 50 / 51)
    assert learning_rate(adamw, 50, 5000) == pytest.approx(1e-3)
    assert learning_rate(adamw, 50 + 4950 // 2, 5000) == pytest.approx(0.5e-3)
    assert learning_rate(adamw, 4999, 5000) < 1e-8


def test_lmnet_recipe_is_adamw_cosine_to_1e6():
    recipe = paper_recipe("lmnet", 2)
    opt = make_optimizer(recipe, torch.nn.Linear(2, 2).parameters())
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 1e-4
    assert learning_rate(recipe, 0, 200) == 1e-3
    assert learning_rate(recipe, 100, 200) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    # torch's CosineAnnealingLR(T_max=200, eta_min=1e-6) epoch by epoch
    reference = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), 1e-3)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(reference, T_max=200, eta_min=1e-6)
    for epoch in range(1, 60):
        reference.step()
        cosine.step()
        assert learning_rate(recipe, epoch, 200) == pytest.approx(reference.param_groups[0]["lr"], rel=1e-9)


def test_mslkseg_has_no_paper_recipe_and_says_so():
    assert not has_paper_recipe("mslkseg")
    assert all(has_paper_recipe(b) for b in ("dlkunet_s", "dlkunet_m", "dlkunet_l", "lgmsnet", "lmnet"))
    with pytest.raises(NetworkConfigError, match="no paper recipe.*plain trainer"):
        paper_recipe("mslkseg", 2)


def test_scheduler_sets_the_rate_from_the_epoch_alone():
    recipe = paper_recipe("lmnet", 2)
    opt = make_optimizer(recipe, torch.nn.Linear(2, 2).parameters())
    scheduler = RecipeLRScheduler(opt, recipe, 50)
    for epoch in (7, 3, 49):  # any order: --c resumes at any epoch
        scheduler.step(epoch)
        assert opt.param_groups[0]["lr"] == learning_rate(recipe, epoch, 50)
    assert math.isclose(learning_rate(recipe, 0, 50), 1e-3)


def test_default_recipe_is_the_papers_where_published_and_resolution_checks_it():
    assert [default_recipe(b, 2) for b in ("dlkunet_s", "dlkunet_m", "dlkunet_l", "lgmsnet", "lmnet", "mslkseg")] == \
        ["paper"] * 5 + ["nnunet"]
    assert default_recipe("lgmsnet", 3) == "paper" and default_recipe("mslkseg", 3) == "nnunet"
    assert resolve_recipe("lmnet", 2, None) == "paper" and resolve_recipe("lmnet", 2, "nnunet") == "nnunet"
    assert resolve_recipe("mslkseg", 2, None) == "nnunet"
    with pytest.raises(NetworkConfigError, match="no paper recipe"):
        resolve_recipe("mslkseg", 2, "paper")
    with pytest.raises(NetworkConfigError, match="choose one of paper, nnunet"):
        resolve_recipe("lmnet", 2, "adam")


def test_saved_recipe_reads_checkpoints_from_before_the_default_changed():
    assert saved_recipe({"recipe": "paper"}) == "paper" and saved_recipe({"recipe": "nnunet"}) == "nnunet"
    assert saved_recipe({"recipe": None}) == "nnunet" and saved_recipe({"num_epochs": 5}) == "nnunet"
