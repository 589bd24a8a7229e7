"""nnunet-lk bench on a tiny plan: every figure present and positive, ratios to stock nnU-Net, the
JSON/markdown outputs, and a backbone that cannot build the configuration listed as skipped.
No timing thresholds: this machine is shared."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest

from nnunet_lk import settings
from nnunet_lk import bench
from nnunet_lk.cli.main import main
from nnunet_lk.networks import registry
from nnunet_lk.plans import derive_plans

DATASET = "Dataset004_Hippocampus"
FIGURES = ("params", "params_without_ds_heads", "macs", "latency_ms_median", "train_step_ms_median")
# peak RSS above the RSS before the build: a tiny net can fit in memory freed after the imports, so >= 0
MEMORY = ("inference_memory_mib", "train_memory_mib")


def test_default_trainers_one_plain_per_backbone():
    from nnunet_lk.nnunet_io import default_trainers, resolve_trainer
    trainers = default_trainers()
    backbones = [resolve_trainer(t).backbone for t in trainers]
    assert sorted(backbones) == registry.list_backbones()
    assert all("_" not in t for t in trainers)  # the plain sigmoid-loss trainer, no ablation variants
    with pytest.raises(ValueError, match="unknown trainer"):
        resolve_trainer("nnUNetTrainerNoSuchThing")


def test_cli_bench_tiny_plan_isolated(nnunet_dirs, hippocampus_plans, hippocampus_dataset_json, tmp_path, capsys):
    folder = nnunet_dirs["preprocessed"] / DATASET
    folder.mkdir()
    tiny = derive_plans(hippocampus_plans, "2d", "nnUNetPlans_tiny", patch_size=[16, 16], batch_size=2)
    (folder / "nnUNetPlans_tiny.json").write_text(json.dumps(tiny))
    (folder / "dataset.json").write_text(json.dumps(hippocampus_dataset_json))
    out = tmp_path / "bench"
    rc = main(["bench", "-d", DATASET, "-c", "2d", "-p", "nnUNetPlans_tiny", "--trainers", "nnUNetTrainerLMNet",
               "--warmup", "0", "--repeats", "2", "--device", "cpu", "--threads", "1", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    record = json.loads((out / f"bench_{DATASET}_2d_nnUNetPlans_tiny_cpu.json").read_text())
    assert record["patch_size"] == [16, 16] and record["train_batch"] == 2 and record["isolated_processes"]
    stock, lmnet = record["results"]
    assert stock["trainer"] == "nnUNetTrainer" and lmnet["trainer"] == "nnUNetTrainerLMNet"
    for r in (stock, lmnet):
        assert r["status"] == "ok", r
        for key in FIGURES:
            assert r[key] > 0, (r["trainer"], key)
        for key in MEMORY:
            assert r[key] >= 0, (r["trainer"], key)
        assert len(r["latency_ms"]["all"]) == 2 and r["peak_rss_mib"] >= r["baseline_rss_mib"] > 0
    assert stock["network_class"] == "PlainConvUNet" and stock["reparam_modules"] == 0
    assert "latency_unfused_ms" not in stock
    # LM-Net re-parameterises: fused and unfused inference both measured, and they agree numerically
    assert lmnet["reparam_modules"] > 0 and lmnet["latency_unfused_ms_median"] > 0
    assert lmnet["fused_vs_unfused_max_abs_diff"] < 1e-3
    for key in FIGURES:
        assert lmnet["ratio_to_stock"][key] == pytest.approx(lmnet[key] / stock[key], rel=1e-3)
    assert set(stock["ratio_to_stock"]) >= set(FIGURES) and stock["ratio_to_stock"]["params"] == 1.0
    table = (out / f"bench_{DATASET}_2d_nnUNetPlans_tiny_cpu.md").read_text()
    assert table in printed
    row = next(line for line in table.splitlines() if "| nnUNetTrainerLMNet |" in line)
    assert f"({lmnet['ratio_to_stock']['params']:.2f}×)" in row
    assert f"{lmnet['macs'] / 1e9:.3f} G" in row


def test_bench_lists_unbuildable_backbone_as_skipped(monkeypatch, hippocampus_plans, hippocampus_dataset_json):
    # pretend LM-Net were 2D-only: on a 3D configuration it is skipped with the reason, stock still measured
    spec = registry.get_backbone("lmnet")
    monkeypatch.setitem(registry._REGISTRY, "lmnet", dataclasses.replace(spec, dims=(2,)))
    plans = derive_plans(hippocampus_plans, "3d_fullres", "nnUNetPlans_tiny3d", patch_size=[16, 16, 16], batch_size=1)
    record = bench.run_bench(plans, hippocampus_dataset_json, "3d_fullres", trainers=["nnUNetTrainerLMNet"],
                             warmup=0, repeats=1, isolate=False, dataset=DATASET, log=lambda m: None)
    stock, skipped = record["results"]
    assert stock["status"] == "ok" and stock["macs"] > 0
    assert skipped == {"trainer": "nnUNetTrainerLMNet", "variant": "shipped", "status": "skipped",
                       "reason": "lmnet is a 2D network and this configuration is 3D"}
    table = bench.markdown_table(record)
    assert "- nnUNetTrainerLMNet (as shipped): skipped: lmnet is a 2D network" in table
    with pytest.raises(ValueError, match="repeats"):
        bench.run_bench(plans, hippocampus_dataset_json, "3d_fullres", repeats=-1)


def test_variants_side_by_side_with_speedups_and_targets(monkeypatch, hippocampus_plans, hippocampus_dataset_json):
    # torch's depthwise path, ours, ours with the whole network channels-last: same network, three rows
    monkeypatch.setenv(settings.DEPTHWISE, "fast")
    plans = derive_plans(hippocampus_plans, "2d", "nnUNetPlans_tiny", patch_size=[16, 16], batch_size=2)
    record = bench.run_bench(plans, hippocampus_dataset_json, "2d", trainers=["nnUNetTrainerLGMSNet"],
                             warmup=0, repeats=1, isolate=False, dataset=DATASET, log=lambda m: None,
                             variants=["torch", "contiguous", "channels_last"], profile=True)
    stock, *rows = record["results"]
    assert stock["variant"] == "shipped" and "speedup_vs_torch_path" not in stock
    assert [(r["trainer"], r["variant"], r["status"]) for r in rows] == [
        ("nnUNetTrainerLGMSNet", v, "ok") for v in ("torch", "contiguous", "channels_last")]
    old, fast, cl = rows
    assert old["depthwise_mode"] == "torch" and fast["depthwise_mode"] == "fast"
    assert cl["channels_last"] and not fast["channels_last"] and not old["channels_last"]
    assert os.environ[settings.DEPTHWISE] == "fast"  # the variant's setting did not leak
    assert old["params"] == fast["params"] == cl["params"]
    for r in (fast, cl):
        assert r["speedup_vs_torch_path"]["train_step_ms_median"] == pytest.approx(
            old["train_step_ms_median"] / r["train_step_ms_median"], rel=1e-3)
    for r, key in ((r, key) for r in rows for key in ("train_step_profile", "latency_profile")):
        shares = r[key]  # the profiled step: shares per kind of op, summing to 1; LGMSNet has depthwise convs
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-3) and shares["depthwise convs"] > 0
        assert shares["attention"] > 0  # its GMS blocks' scaled-dot-product attention
    checks = bench.report.target_checks(record)
    speed, latency = checks  # 2D: the training speed-up target (2x) and LGMSNet's latency vs stock
    # read in the layout LGMSNet ships with in 2D (channels-last), whichever variant happened to be faster
    assert cl["shipped_channels_last"] and fast["shipped_channels_last"]
    assert speed["value"] == pytest.approx(old["train_step_ms_median"] / cl["train_step_ms_median"], rel=1e-3)
    assert speed["met"] == (speed["value"] >= 2.0) and latency["met"] == (latency["value"] <= 1.0)
    table = bench.markdown_table(record)
    assert "| torch depthwise |" in table and "| ours, channels-last |" in table
    assert f"- {speed['text']}" in table and "Where one training step goes" in table
    assert "Where one inference forward goes" in table
    with pytest.raises(ValueError, match="--variants nchw"):
        bench.run_bench(plans, hippocampus_dataset_json, "2d", variants=["nchw"])


def test_a_network_over_the_timeout_is_reported_not_fatal():
    from nnunet_lk.bench import _measure_in_subprocess  # noqa: PLC0415
    r = _measure_in_subprocess({"trainer": "nnUNetTrainer", "sleep_forever": True}, timeout=0.01)
    assert r["status"] == "timeout" and "--timeout" in r["reason"]
