import json
import os

import pytest
import torch

from nnunet_lk import settings
from nnunet_lk.cli.main import main


def test_list_names_backbones_and_trainers(capsys):
    assert main(["list", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"dlkunet_s", "dlkunet_m", "dlkunet_l"} <= set(listing["backbones"])
    assert "nnUNetTrainerDLKUNetL" in listing["backbones"]["dlkunet_l"]["trainers"]
    assert "nnUNetTrainerDLKUNetM_PhaseLoss" in listing["trainers"]


def test_summary_json_contract(capsys):
    assert main(["summary", "dlkunet_s", "--dim", "2", "--in-channels", "1", "--classes", "9", "--patch", "64", "64",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["name"] == "dlkunet_s"
    assert result["params_without_ds_heads"] == 1_131_379
    assert result["params"] > result["params_without_ds_heads"]
    # MACs scale with the pixel count: 64² is 1/12.25 of the paper's 224²; true MACs at 224² are 10.28 G
    assert result["macs"] == pytest.approx(10.28e9 * (64 * 64) / (224 * 224), rel=0.01)


def test_summary_3d_with_options_and_errors(capsys):
    assert main(["summary", "dlkunet_m", "--dim", "3", "--in-channels", "1", "--classes", "3", "--patch", "16", "32",
                 "32", "--strides", "[[1,1,1],[1,2,2],[2,2,2],[2,2,2]]", "--option", "width=8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["level_strides"] == [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]] and result["macs"] > 0
    assert main(["summary", "dlkunet_x", "--dim", "2", "--in-channels", "1", "--classes", "2", "--patch", "8", "8"]) == 2
    assert "unknown backbone" in capsys.readouterr().err
    assert main(["summary", "dlkunet_l", "--dim", "2", "--in-channels", "1", "--classes", "2", "--patch", "8", "8"]) == 2
    assert "Increase 'patch_size'" in capsys.readouterr().err


def test_env_prints_the_trainer_folder(capsys, monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", "/some/other/folder")
    assert main(["env"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith('export nnUNet_extTrainer="/some/other/folder' + os.pathsep)
    folder = line.split(os.pathsep)[-1].rstrip('"')
    assert os.path.isfile(os.path.join(folder, "nnunet_lk_trainers.py"))


def test_plans_command_writes_variant_and_never_overwrites(hippocampus_plans, nnunet_dirs, capsys):
    folder = nnunet_dirs["preprocessed"] / "Dataset004_Hippocampus"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(hippocampus_plans))
    args = ["plans", "-d", "4", "-c", "2d", "--name", "nnUNetPlans_cpu", "--batch", "8", "--patch", "48", "32",
            "--option", "dlkunet_s.width=24"]
    assert main(args) == 0
    out = capsys.readouterr().out
    device = "" if torch.cuda.is_available() else " -device cpu"  # the walk-through's CPU path, copy-paste ready
    assert f"train with:   nnUNetv2_train 4 2d FOLD -tr TRAINER -p nnUNetPlans_cpu{device}\n" in out
    assert f"predict with: nnUNetv2_predict -i INPUT -o OUTPUT -d 4 -c 2d -f FOLD -tr TRAINER -p nnUNetPlans_cpu" \
           f"{device}\n" in out
    derived = json.loads((folder / "nnUNetPlans_cpu.json").read_text())
    assert derived["configurations"]["2d"]["batch_size"] == 8
    assert derived["configurations"]["2d"]["nnunet_lk"] == {"dlkunet_s": {"width": 24}}
    before = (folder / "nnUNetPlans_cpu.json").read_text()
    assert main(args[:-2] + ["--batch", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (folder / "nnUNetPlans_cpu.json").read_text() == before  # nothing lost
    assert main(["plans", "-d", "4", "-c", "2d", "--name", "nnUNetPlans"]) == 2  # the source is protected
    assert main(["plans", "-d", "4", "-c", "2d", "--name", "x", "--patch", "50", "40"]) == 2
    assert not (folder / "x.json").exists()


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(extra)
    return env


def test_startup_hook_sets_ext_trainer_without_shell_setup():
    # README's set-up runs `nnunet-lk env --install`: then no shell line is needed before the stock CLIs.
    import subprocess
    import sys
    from nnunet_lk.env import trainer_folder
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"],
                          env=_clean_env(), capture_output=True, text=True)
    assert proc.stdout.strip() == trainer_folder(), "run `nnunet-lk env --install` (README set-up)"


def test_unknown_trainer_in_stock_cli_gets_a_hint(tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    train = Path(sys.executable).parent / "nnUNetv2_train"
    env = _clean_env(nnUNet_raw=str(tmp_path), nnUNet_preprocessed=str(tmp_path), nnUNet_results=str(tmp_path))
    proc = subprocess.run([str(train), "4", "2d", "0", "-tr", "nnUNetTrainerDLKUNetXL"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert "Did you mean nnUNetTrainerDLKUNetL" in proc.stderr
    assert "nnunet-lk doctor" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def test_non_editable_install_ships_the_scanned_folder_and_presets(tmp_path):
    # `pip install .` (not -e) must carry trainers/ (as nnunet_lk_ext) and plans/ (as nnunet_lk.presets).
    import subprocess
    import sys
    import zipfile
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(repo), "-w", str(tmp_path)],
                   check=True, capture_output=True, timeout=600)
    names = zipfile.ZipFile(next(tmp_path.glob("nnunet_lk-*.whl"))).namelist()
    assert "nnunet_lk_ext/nnunet_lk_trainers.py" in names
    assert "nnunet_lk/presets/lite_3d.json" in names and "nnunet_lk/cli/main.py" in names


# ---- the newcomer's path, through the installed command -----------------------------------------------------
def _nnunet_lk(*args, env=None):
    from tests.helpers.realdata import BIN, run
    return run([BIN / "nnunet-lk", *args], env=env or dict(os.environ), timeout=600, check=False)


@pytest.mark.parametrize("patch,message", [
    (["-56", "40"], "patch size [-56, 40]: every size must be a positive number of voxels (the configuration's own "
                    "patch: --patch 56 40)"),
    (["0", "40"], "patch size [0, 40]: every size must be a positive number of voxels"),
    (["8", "8"], "patch size [8, 8] is too small"),
    (["57", "41"], "Use --patch 56 40 (nearest below) or --patch 64 48 (nearest above)"),
])
def test_plans_cli_refuses_bad_patches_and_keeps_what_exists(hippocampus_plans, nnunet_dirs, patch, message):
    folder = nnunet_dirs["preprocessed"] / "Dataset004_Hippocampus"
    folder.mkdir()
    (folder / "nnUNetPlans.json").write_text(json.dumps(hippocampus_plans))
    existing = folder / "nnUNetPlans_small.json"
    existing.write_text('{"written": "before"}')
    proc = _nnunet_lk("plans", "-d", "4", "-c", "2d", "--name", "nnUNetPlans_small", "--force", "--patch", *patch)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    if patch == ["8", "8"]:  # the cause and the computed smallest size, in the proportions asked for
        assert "NaN loss" in proc.stderr and "--patch 16 16" in proc.stderr
    assert existing.read_text() == '{"written": "before"}'
    assert sorted(p.name for p in folder.iterdir()) == ["nnUNetPlans.json", "nnUNetPlans_small.json"]


def test_summary_without_flags_shows_the_papers_configuration():
    proc = _nnunet_lk("summary", "dlkunet_s")
    assert proc.returncode == 0, proc.stderr
    assert "2D, 1 -> 9, patch [224, 224]" in proc.stdout
    assert "params w/o DS heads: 1,131,379" in proc.stdout  # the official code's count (README)
    proc = _nnunet_lk("summary", "dlkunet_s", "--dim", "3")
    assert proc.returncode == 2 and "no paper configuration in 3D" in proc.stderr
    assert "--in-channels --classes --patch" in proc.stderr


def test_every_backbone_has_a_paper_configuration():
    from nnunet_lk.analysis import PAPER_CONFIGURATIONS, summary_configuration
    from nnunet_lk.networks import list_backbones
    assert sorted(PAPER_CONFIGURATIONS) == list_backbones()
    assert summary_configuration("lgmsnet", dim=3) == {"dim": 3, "input_channels": 1, "num_classes": 14,
                                                       "patch_size": [96, 96, 96]}
    assert summary_configuration("lmnet", num_classes=5)["num_classes"] == 5


def test_doctor_right_after_install_warns_about_data_folders_and_passes():
    env = {k: v for k, v in os.environ.items() if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    proc = _nnunet_lk("doctor", env={**env, settings.THREADS: "1"})
    assert proc.returncode == 0, proc.stdout
    assert "with -device cpu: 1 in training and prediction (NNUNET_LK_THREADS=1)" in proc.stdout
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert f"[warn] {var} is not set" in proc.stdout and f"export {var}=" in proc.stdout
    assert "in prediction now (the cores idle at its start, of" in _nnunet_lk("doctor", env=env).stdout
    assert "[FAIL]" not in proc.stdout and "[ok] nnU-Net finds nnUNetTrainerDLKUNetS" in proc.stdout


def test_help_describes_the_tool_for_users():
    proc = _nnunet_lk("--help")
    assert proc.returncode == 0
    description = proc.stdout.split("\n\n")[1]
    assert "as nnU-Net v2 trainers" in " ".join(description.split()) and "registered" not in description


@pytest.mark.slow
def test_startup_hook_survives_uninstalling_the_package_and_env_uninstall_removes_it(tmp_path):
    """The real `site` start-up of a scratch venv: install the package (no dependencies), install the hook, then
    `pip uninstall` the package: Python must start silently (the guarded hook does nothing)."""
    import sys
    from tests.helpers.realdata import REPO, run
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", REPO, "-w", tmp_path / "wheel"], env, timeout=600)
    wheel = next((tmp_path / "wheel").glob("nnunet_lk-*.whl"))
    venv = tmp_path / "scratch"
    run(["python3", "-m", "venv", venv], env, timeout=300)
    python = venv / "bin" / "python"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], env, timeout=600)
    run([python, "-c", "import nnunet_lk.env as e; e.install_pth()"], env)
    started = run([python, "-c", "import os; print(os.environ.get('nnUNet_extTrainer'))"], env)
    assert started.stdout.strip().endswith("nnunet_lk_ext") and started.stderr == ""  # the hook ran at start-up

    run([python, "-m", "pip", "uninstall", "-y", "-q", "nnunet-lk"], env)
    hooks = list((venv / "lib").glob("python3*/site-packages/nnunet_lk_ext_trainer.pth"))
    assert len(hooks) == 1  # pip leaves it behind
    silent = run([python, "-c", "print('started')"], env)
    assert silent.stdout == "started\n" and silent.stderr == ""

    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], env, timeout=600)
    hooks[0].write_text("import nnunet_lk.env as _e; _e.ensure_environment()\n")  # the old, unguarded form
    report = run([python, "-c", "import nnunet_lk.env as e; print(e.hook_problems())"], env)
    assert "stale start-up hook" in report.stdout
    run([python, "-c", "import nnunet_lk.env as e; e.uninstall_pth()"], env)
    assert not hooks[0].exists()


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
    import importlib.util

    from nnunet_lk.errors import MissingExtraError
    from nnunet_lk.extras import EXTRAS, require_extra
    real = importlib.util.find_spec
    for extra, modules in EXTRAS.items():
        require_extra(extra, "this test")  # the test extra installs every one
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == modules[0] else real(name, *a))
        with pytest.raises(MissingExtraError, match=rf"{modules[0]}.*pip install 'nnunet-lk\[{extra}\]'"):
            require_extra(extra, "this test")
        monkeypatch.setattr(importlib.util, "find_spec", real)


def test_list_and_summary_help_show_every_option_with_its_default(capsys):
    from nnunet_lk.cli.main import main
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "options: levels=3, width=96, norm='batch', pad_input=True" in out
    assert "ld_kernel=21" in out
    with pytest.raises(SystemExit):
        main(["summary", "--help"])
    assert "lmnet: levels=5, width=12, heads=12" in capsys.readouterr().out


OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "monai", "submitit", "matplotlib", "openvino")
BLOCK_OPTIONAL = f'''import sys
class _NoExtras:
    """As if nnunet-lk were installed without its extras."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _NoExtras())
'''


def test_every_command_help_works_without_the_optional_extras(tmp_path):
    """`pip install nnunet-lk` without extras: every command's --help still works (the extras are imported only
    behind their guard)."""
    (tmp_path / "sitecustomize.py").write_text(BLOCK_OPTIONAL)
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    blocked = _nnunet_lk("export", "x", "-f", "0", "-o", str(tmp_path / "m.onnx"), env=env)
    assert blocked.returncode != 0 and "pip install 'nnunet-lk[export]'" in blocked.stderr  # the block works
    commands = ("list", "summary", "env", "doctor", "plans", "bench", "ablate", "export", "predict", "predict-onnx",
                "quantize")
    for command in ("", *commands):
        proc = _nnunet_lk(*([command] if command else []), "--help", env=env)
        assert proc.returncode == 0 and "usage: nnunet-lk" in proc.stdout, (command, proc.stderr[-2000:])
        assert "ModuleNotFoundError" not in proc.stderr
    # the one command with --dry-run: the job list without any extra; slurm's names the extra it needs
    for name in ("raw", "preprocessed", "results"):
        (tmp_path / name / "Dataset004_Hippocampus").mkdir(parents=True)
        env[f"nnUNet_{name}"] = str(tmp_path / name)
    dry = ["ablate", "-d", "4", "-c", "2d", "--run", "--folds", "0", "--trainers", "nnUNetTrainerLGMSNet",
           "--device", "cpu", "--dry-run", "-o", str(tmp_path / "ablation")]
    for executor in ("sequential", "local"):
        proc = _nnunet_lk(*dry, "--executor", executor, "--repeats", "2", env=env)
        assert proc.returncode == 0 and "2 (trainer, configuration, fold, repeat) job(s)" in proc.stdout, \
            proc.stderr[-2000:]
    proc = _nnunet_lk(*dry, "--executor", "slurm", env=env)
    assert proc.returncode != 0 and "pip install 'nnunet-lk[slurm]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    # the prediction engines name their extra before anything is read
    for engine, extra in (("openvino", "openvino"), ("onnxruntime", "export")):
        proc = _nnunet_lk("predict", "--engine", engine, "-i", str(tmp_path), "-o", str(tmp_path / "out"), "-m",
                          str(tmp_path / "model"), "-f", "0", env=env)
        assert proc.returncode != 0 and f"pip install 'nnunet-lk[{extra}]'" in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    proc = _nnunet_lk("quantize", str(tmp_path / "model"), "-f", "0", env=env)
    assert proc.returncode != 0 and "pip install 'nnunet-lk[export]'" in proc.stderr and "Traceback" not in proc.stderr
