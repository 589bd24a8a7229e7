"""What the start-up hook does (nnunet_lk/startup.py): the trainer folder and hints for every Python, the
prediction checks only for the stock prediction commands. The real hook runs in every subprocess test of
tests/test_hints.py; these check the dispatch itself."""
import signal
import sys

import pytest

from nnunet_lk import settings, startup


@pytest.mark.parametrize("args,flag,value", [
    (["-i", "in/", "-o", "out/"], "-i", "in/"),
    (["-d", "4", "-o=out/"], "-o", "out/"),
    (["-i"], "-i", None),  # argparse will complain itself
    (["-d", "4"], "-o", None),
])
def test_flag_value(args, flag, value):
    assert startup.flag_value(args, flag) == value


@pytest.fixture
def fresh_start(monkeypatch):
    monkeypatch.setattr(startup, "_started", False)
    monkeypatch.setattr(settings, "_prediction_process", False)
    monkeypatch.setattr(settings, "_idle_at_start", None)
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_prediction_command_gets_the_checks_and_the_interrupt_handler(fresh_start, tmp_path, capsys):
    (tmp_path / "case_0000.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    startup.start(["/venv/bin/nnUNetv2_predict", "-i", str(tmp_path), "-o", str(tmp_path / "out")])
    assert settings._prediction_process
    assert signal.getsignal(signal.SIGINT).__qualname__ == "install.<locals>.on_interrupt"
    assert getattr(sys.excepthook, "nnunet_lk_hint", False)
    assert "case_0000.nii.gz: its NIfTI header cannot be read" in capsys.readouterr().err
    startup.start(["/venv/bin/nnUNetv2_predict", "-i", str(tmp_path)])  # idempotent: nothing printed twice
    assert capsys.readouterr().err == ""


def test_any_other_python_gets_only_the_environment_and_hints(fresh_start, capsys):
    before = signal.getsignal(signal.SIGINT)
    startup.start(["/venv/bin/nnUNetv2_train", "4", "2d", "0"])
    assert not settings._prediction_process and signal.getsignal(signal.SIGINT) is before
    assert getattr(sys.excepthook, "nnunet_lk_hint", False) and capsys.readouterr().err == ""
