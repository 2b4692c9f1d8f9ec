"""The library logs through `logging` and prints nothing itself; the CLI shows the log (info on stdout,
warnings on stderr) at the level of `monossl -q` / `-v`, and leaves the logger as it found it."""

import logging

import pytest
import torch

from monossl.cli import _show_log, main
from monossl.data.datasets import load_pair, subset
from monossl.eval.probe import probe
from monossl.eval.protocols import get_protocol
from monossl.models import random_trunk
from monossl.pretrain import PretrainConfig, pretrain

LOGGER = logging.getLogger("monossl")


@pytest.fixture
def logger_level():
    """Put the library logger's level back after the test."""
    before = LOGGER.level
    yield
    LOGGER.setLevel(before)


def _tiny_probe(data_dir):
    train, test = load_pair(f"cifar10:{data_dir}")
    trunk = random_trunk("cifar", seed=0)
    return probe(trunk, subset(train, 100), subset(test, 50), get_protocol("cifar").with_overrides(epochs=1),
                 device="cpu", progress=False, verbose=True, workers=0)


def _pretrain_argv(out, *extra):
    return ["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", "--steps", "3", "--batch-size", "8",
            "--out", str(out), "--quiet", *extra]


def _probe_argv(data_dir, out):
    return ["probe", "--random", "--arch", "cifar", "--data", f"cifar10:{data_dir}", "--subset", "100",
            "--test-subset", "50", "--epochs", "1", "--device", "cpu", "--workers", "0", "--out", str(out)]


def test_the_library_prints_nothing_when_its_logger_is_silenced(tmp_path, cifar_subset_dir, capsys, logger_level,
                                                                one_thread):
    restore = _show_log(logging.INFO)  # the CLI's handler, so that anything logged would be shown
    try:
        LOGGER.setLevel(logging.CRITICAL)
        run = pretrain(PretrainConfig(method="rotnet", out=tmp_path / "run", images=["builtin:astronaut"], steps=3,
                                      batch_size=8, progress=False))
        result = _tiny_probe(cifar_subset_dir)
        assert run.finished and set(result["taps"]) == {"conv1", "conv2", "conv3", "conv4"}
        assert capsys.readouterr() == ("", "")

        LOGGER.setLevel(logging.INFO)  # the control: the same probe at INFO is shown, on stdout
        _tiny_probe(cifar_subset_dir)
        out, err = capsys.readouterr()
        assert out.startswith("probe cifar") and "| conv1 |" in out and "  epoch 1/1 lr" in out and err == ""
    finally:
        restore()


def test_quiet_and_verbose_change_what_is_shown(tmp_path, cifar_subset_dir, capsys, one_thread):
    assert main(_probe_argv(cifar_subset_dir, tmp_path / "default")) == 0
    out, err = capsys.readouterr()
    assert "probe cifar" in out and "conv2: 64x16x16 -> " in out and "wrote" in out and err == ""
    assert main(["-q", *_probe_argv(cifar_subset_dir, tmp_path / "quiet")]) == 0
    assert capsys.readouterr() == ("", "")  # warnings and errors only: the probe has none
    assert (tmp_path / "quiet" / "results.json").is_file()  # and it did run

    assert main(_pretrain_argv(tmp_path / "a")) == 0
    out, err = capsys.readouterr()
    assert out == f"pretrained rotnet for 3 steps -> {tmp_path / 'a' / 'trunk.pt'}\n" and err == ""  # the CLI's line
    assert main(["--verbose", *_pretrain_argv(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"pretrained rotnet for 3 steps -> {tmp_path / 'b' / 'trunk.pt'}"
    assert f"TensorBoard event files in {tmp_path / 'b'} (from step 0)" in lines
    assert any(line.startswith("step 3: loss ") for line in lines)  # each logged step, at debug


def test_info_goes_to_stdout_and_warnings_to_stderr_and_the_logger_is_left_as_found(capsys, logger_level):
    LOGGER.setLevel(logging.ERROR)
    handlers = list(LOGGER.handlers)
    restore = _show_log(logging.INFO)
    log = logging.getLogger("monossl.some_module")
    log.debug("not shown at INFO")
    log.info("a plain line")
    log.warning("look out")
    restore()
    assert capsys.readouterr() == ("a plain line\n", "WARNING: look out\n")
    assert LOGGER.level == logging.ERROR and LOGGER.handlers == handlers

    assert main(["-q", "images"]) == 0 and LOGGER.level == logging.ERROR and LOGGER.handlers == handlers
    assert "astronaut" in capsys.readouterr().out  # a command's own output is not the log: -q keeps it


def test_quiet_and_verbose_together_are_refused_in_one_line(capsys):
    assert main(["-q", "-v", "images"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monossl: error: argument -v/--verbose: not allowed with argument -q/--quiet")
    assert err.count("\n") == 1


def test_a_deepcluster_collapse_is_a_warning_on_stderr(capsys):
    from monossl.data.batches import TensorSource
    from monossl.methods.deepcluster import DeepCluster, DeepClusterConfig
    from monossl.models import build_trunk

    restore = _show_log(logging.INFO)
    try:
        torch.manual_seed(0)
        method = DeepCluster(build_trunk("cifar", widths=(8, 8, 16, 16)), 100, DeepClusterConfig(clusters=4))
        method.begin_epoch(0, TensorSource(torch.full((40, 3, 32, 32), 128, dtype=torch.uint8), seed=0))
    finally:
        restore()
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("WARNING: deepcluster epoch 0: the clustering collapsed")
