"""Issue 12, made permanent: each hostile-but-ordinary input runs through the CLI and gets exit code 2 and one
`monossl: error:` line naming the file or option (no traceback, no torch advice to pass weights_only=False),
leaves no partial file or empty --out behind, and runs no code from a file it reads.

Cases are numbered as in the issue (docs/hardening.md lists each with what it prints)."""

from __future__ import annotations

import errno
import os
import pickle
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import monossl
from monossl import runs
from monossl.cli import main

TINY = ["--steps", "2", "--batch-size", "4", "--widths", "8,8,16,16", "--quiet"]


def pretrain_argv(out, *extra):
    return ["pretrain", "--method", "rotnet", "--image", "builtin:astronaut", *TINY, "--out", str(out), *extra]


def one_error(capsys, argv, *words) -> str:
    """Run the CLI; it must fail with exit 2 and exactly one `monossl: error:` line holding every word."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("monossl: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err and "weights_only" not in err, err
    for word in words:
        assert str(word) in err, (word, err)
    return err


def leftovers(root: Path) -> list[str]:
    """Half-written files: atomic writes' temporaries and the npy writer's partial array."""
    return [str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".partial"))]


class Payload:
    """A pickle that creates `marker` when it is loaded: what a hostile run directory would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny finished RotNet run (config.json, last.pt, trunk.pt); tests copy it."""
    run = tmp_path_factory.mktemp("hardening") / "run"
    assert main(pretrain_argv(run)) == 0
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ----------------------------------------------------------------------------- 1. no code runs from a file


def test_1_hostile_last_pt_is_refused_by_pretrain_resume(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"step": 1, "training": Payload(marker)}, run_copy / "last.pt")
    one_error(capsys, pretrain_argv(run_copy, "--resume"), run_copy / "last.pt", "posix.system")
    assert not marker.exists()
    # the file is live: an unchecked torch.load would have run it
    torch.load(run_copy / "last.pt", weights_only=False)
    assert marker.exists()


def test_1_hostile_last_pt_is_refused_by_compare_and_finetune(finished_run, tmp_path, capsys, cifar_subset_dir):
    marker = tmp_path / "PWNED"
    # compare resumes an unfinished row on its own: make one exactly as compare would, then poison it
    out = tmp_path / "cmp"
    row = ["--out", out / "image", "--seed", "0", "--device", "auto", "--widths", "8,8,16,16", "--quiet",
           "--method", "rotnet", "--image", "builtin:astronaut", "--preset", "all", "--steps", "2"]
    assert main(["pretrain", *map(str, row), "--stop-after", "1"]) == 0
    torch.save({"step": 1, "training": Payload(marker)}, out / "image" / "last.pt")
    one_error(capsys, ["compare", "--data", f"cifar10:{cifar_subset_dir}", "--rows", "image", "--method", "rotnet",
                       "--steps", "2", "--widths", "8,8,16,16", "--out", out, "--quiet"], out / "image" / "last.pt",
              "posix.system")
    assert not marker.exists()

    ft = tmp_path / "ft"
    finetune = ["finetune", finished_run, "--data", f"cifar10:{cifar_subset_dir}", "--steps", "2", "--batch-size", "4",
                "--out", ft, "--quiet"]
    assert main([str(a) for a in finetune] + ["--stop-after", "1"]) == 0
    torch.save({"step": 1, "training": Payload(marker)}, ft / "last.pt")
    one_error(capsys, finetune + ["--resume"], ft / "last.pt", "posix.system")
    assert not marker.exists()


def test_1_hostile_trunk_pt_is_refused(run_copy, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    torch.save({"format": "monossl.trunk/1", "arch": Payload(marker)}, run_copy / "trunk.pt")
    out = tmp_path / "probe"
    one_error(capsys, ["probe", run_copy, "--out", out], run_copy / "trunk.pt", "posix.system")
    assert not marker.exists() and not out.exists()


def write_cifar_pickles(root: Path, protocol: int = pickle.DEFAULT_PROTOCOL, hostile: Payload | None = None) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": name.encode(), b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, 4)]}
        if hostile is not None and name == "data_batch_2":
            batch[b"labels"] = hostile
        (d / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    (d / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"c%d" % i for i in range(10)]}, protocol=protocol))
    return d


def test_1_hostile_cifar_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    d = write_cifar_pickles(tmp_path / "data", hostile=Payload(marker))
    out = tmp_path / "probe"
    one_error(capsys, ["probe", "--random", "--data", f"cifar10:{d}", "--out", out],
              d / "data_batch_2", "posix.system")
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_1_cifar_pickles_of_every_protocol_still_load(tmp_path, protocol):
    from monossl.data.datasets import load_pair

    train, test = load_pair(f"cifar10:{write_cifar_pickles(tmp_path, protocol)}")
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4 and train.classes[3] == "c3"


# ----------------------------------------------------------------------------- 2. decompression bomb


@pytest.fixture
def bomb(tmp_path) -> Path:
    """A 200-byte PNG whose header declares 50000 x 50000 pixels."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("command", ["generate", "pretrain", "stylize"])
def test_2_decompression_bomb_is_refused_with_size_and_limit(bomb, tmp_path, capsys, command):
    out = tmp_path / "out"
    argv = {"generate": ["generate", "--image", bomb, "--out", out],
            "pretrain": pretrain_argv(out)[:4] + [bomb] + pretrain_argv(out)[5:],
            "stylize": ["stylize", "--random", "--content", bomb, "--out", out / "s.png"]}[command]
    one_error(capsys, argv, bomb, "2500000000 pixels", f"{2 * Image.MAX_IMAGE_PIXELS} pixels")
    assert not out.exists()


# ----------------------------------------------------------------------------- 3-5. option values


@pytest.mark.parametrize("argv, option", [
    (["generate", "--set", "area_range=1/0,1"], "--set area_range=1/0,1"),  # 3
    (pretrain_argv("{out}", "--lr", "-1"), "--lr"),  # 4
    (["probe", "--random", "--lr", "-1"], "--lr"),
    (["finetune", "{run}", "--data", "cifar10", "--lr", "-0.5"], "--lr"),
    (pretrain_argv("{out}", "--lr", "nan"), "--lr"),
    (pretrain_argv("{out}", "--batch-size", "0"), "--batch-size"),  # 5: zero is refused, not the default
    (pretrain_argv("{out}", "--patch-size", "0"), "--patch-size"),
    (pretrain_argv("{out}", "--steps", "-3"), "--steps"),
    (["probe", "--random", "--subset", "0"], "--subset"),
    (["finetune", "{run}", "--data", "cifar10", "--steps", "0"], "--steps"),
    (["generate", "--batch-size", "0"], "--batch-size"),
    (["compare", "--steps", "0"], "--steps"),
    (["reproduce", "cifar10-augmentations", "--subset", "0"], "--subset"),
])
def test_3_4_5_bad_numbers_are_refused_naming_the_option(finished_run, tmp_path, capsys, argv, option):
    out = tmp_path / "out"
    argv = [a.replace("{out}", str(out)).replace("{run}", str(finished_run)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(out)]
    one_error(capsys, argv, option)
    assert not out.exists()


# ----------------------------------------------------------------------------- 6. corrupt image in a folder


@pytest.mark.parametrize("workers", ["0", "1"])  # 1: the error crosses a DataLoader worker process
def test_6_probe_names_a_corrupt_folder_image(finished_run, tiny_imagefolder, tmp_path, capsys, workers):
    data = Path(shutil.copytree(tiny_imagefolder, tmp_path / "folder"))
    bad = data / "train" / "green" / "green_1.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "probe"
    one_error(capsys, ["probe", finished_run, "--data", f"folder:{data}", "--epochs", "1", "--workers", workers,
                       "--out", out, "--quiet"], bad, "not a readable image")
    assert not (out / "results.json").exists()


# ----------------------------------------------------------------------------- 7, 8, 12c. bad checkpoints


@pytest.mark.slow
def test_7_bad_trunk_checkpoints(run_copy, tmp_path, capsys):
    trunk = run_copy / "trunk.pt"
    good = torch.load(trunk, weights_only=True)
    cases = {
        "empty": (b"", "truncated or corrupt"),
        "unknown arch_config key": ({**good, "arch_config": {**good["arch_config"], "depth": 3}}, "depth"),
        "no arch": ({k: v for k, v in good.items() if k != "arch"}, "needs arch"),
    }
    for name, (content, words) in cases.items():
        if isinstance(content, bytes):
            trunk.write_bytes(content)
        else:
            torch.save(content, trunk)
        out = tmp_path / "probe"
        one_error(capsys, ["probe", trunk, "--out", out], trunk, words)
        assert not out.exists(), name


def test_8_corrupt_resume_files_are_named_and_kept(run_copy, capsys):
    last = run_copy / "last.pt"
    whole = last.read_bytes()
    for content in (os.urandom(4096), whole[: len(whole) // 2], b""):
        last.write_bytes(content)
        one_error(capsys, pretrain_argv(run_copy, "--resume"), last, "not a readable training checkpoint",
                  "truncated or corrupt")
        assert last.read_bytes() == content  # the evidence is left for the user
    last.write_bytes(whole)
    config = run_copy / "config.json"
    config.write_text(config.read_text()[:40])
    one_error(capsys, pretrain_argv(run_copy, "--resume"), config, "not a readable run configuration")


# ----------------------------------------------------------------------------- 9. disk full


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a directory on a tmpfs of that size (skipped where mounting is not permitted)."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        d = tmp_path / f"disk-{size}"
        d.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(d)], capture_output=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("extra", [["--format", "png", "--workers", "1"],
                                   ["--format", "png", "--workers", "2", "--batch-size", "16"],  # forked writers
                                   ["--format", "npy"]])  # a memory-mapped array: SIGBUS without preallocation
def test_9_generate_on_a_full_disk(small_disk, capsys, extra):
    out = small_disk("200k") / "patches"
    one_error(capsys, ["generate", "--count", "300", "--out", out, *extra], "no space left on device writing", out)
    assert not leftovers(out)


def test_9_pretrain_on_a_full_disk_keeps_the_last_good_checkpoint(small_disk, capsys):
    out = small_disk("100k") / "run"  # room for one checkpoint (about 50 KB), not for its replacement beside it
    one_error(capsys, pretrain_argv(out, "--steps", "3"), f"no space left on device writing {out / 'last.pt'}")
    assert not leftovers(out)
    assert runs.load_torch(out / "last.pt")["step"] >= 1


def test_9_a_full_disk_anywhere_in_a_torch_save(tmp_path, capsys, monkeypatch):
    """Without tmpfs: torch.save reports a failed write as a RuntimeError raised while handling the OSError."""
    real, calls = torch.save, []

    def save(obj, f):
        calls.append(1)
        if len(calls) == 1:
            return real(obj, f)
        f.write(b"half a checkpoint")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos") from None

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    one_error(capsys, pretrain_argv(out, "--steps", "3"), f"no space left on device writing {out / 'last.pt'}")
    assert not leftovers(out) and runs.load_torch(out / "last.pt")["step"] == 1


# ----------------------------------------------------------------------------- 10. one process per run directory


def test_10_a_run_directory_in_use_is_refused_and_a_dead_lock_does_not_block(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(pretrain_argv(run, "--stop-after", "1")) == 0
    patches = tmp_path / "patches"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from monossl import runs\n"
         "for d in sys.argv[1:]: runs.lock_run_dir(d)\nprint('locked', flush=True); sys.stdin.read()",
         str(run), str(patches)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(monossl.__file__).parents[1])})
    try:
        assert holder.stdout.readline().strip() == "locked"
        one_error(capsys, pretrain_argv(run, "--resume"), run, f"pid {holder.pid}", "in use")
        one_error(capsys, pretrain_argv(run), run, f"pid {holder.pid}")  # not "pass --resume": it is in use
        one_error(capsys, ["generate", "--count", "4", "--out", patches], patches, f"pid {holder.pid}")
    finally:
        holder.kill()  # as kill -9: no chance to clean up
        holder.wait()
    assert (run / ".lock").read_text().strip() == str(holder.pid)  # the dead process's lock file is still there
    assert main(pretrain_argv(run, "--resume")) == 0
    assert (run / "trunk.pt").exists()


# ----------------------------------------------------------------------------- 11. Ctrl-C says how to resume


def test_11_ctrl_c_prints_the_command_that_resumes(tmp_path, capsys, monkeypatch):
    from monossl import pretrain

    real = pretrain.train

    def interrupted(method, source, loop, *args, **kwargs):
        loop.stop_after = 1  # a checkpoint is written, then Ctrl-C
        real(method, source, loop, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "train", interrupted)
    argv = pretrain_argv(tmp_path / "a run")
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"monossl: interrupted; to resume, run: {shlex.join(['monossl', *argv, '--resume'])}"
    monkeypatch.undo()
    command = shlex.split(err.split("run: ", 1)[1])
    assert command[0] == "monossl" and main(command[1:]) == 0
    assert (tmp_path / "a run" / "trunk.pt").exists()


def test_11_ctrl_c_without_resume_option_prints_the_same_command(tmp_path, capsys, monkeypatch):
    from monossl.data import generate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate, "write_patch_files", interrupted)
    argv = ["generate", "--count", "4", "--out", str(tmp_path / "p")]
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith(f"run: {shlex.join(['monossl', *argv])}")


# ----------------------------------------------------------------------------- 12. smaller ones


def test_12_an_image_name_with_a_comma(tmp_path):
    image = tmp_path / "holiday, day 2.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)).save(image)
    assert main(["generate", "--image", str(image), "--count", "2", "--workers", "1",
                 "--out", str(tmp_path / "g")]) == 0
    assert main(pretrain_argv(tmp_path / "r")[:4] + [str(image)] + pretrain_argv(tmp_path / "r")[5:]) == 0


def test_12_exit_2_errors_leave_no_empty_out(finished_run, tiny_imagefolder, tmp_path, capsys):
    out = tmp_path / "out"
    missing = f"cifar10:{tmp_path / 'nothing'}"
    for argv, words in [
        (pretrain_argv(out)[:3] + ["--data", f"folder:{tiny_imagefolder}", *TINY, "--batch-size", "64", "--out", out],
         "--batch-size 64"),  # 12 training images: fewer than one batch
        (["probe", finished_run, "--data", missing, "--out", out], "nothing"),
        (["finetune", finished_run, "--data", missing, "--out", out], "nothing"),
        (["compare", "--data", missing, "--out", out], "nothing"),
        (["reproduce", "cifar10-augmentations", "--data", missing, "--out", out], "nothing"),
        (["generate", "--image", tmp_path / "nope.png", "--out", out], "nope.png"),
    ]:
        one_error(capsys, argv, words)
        assert not out.exists(), argv
