"""`monossl generate` end to end through the CLI: formats, metadata, resume, bad input."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from monossl import cli
from monossl.data import generate as gen
from monossl.data.patch_config import make_config
from monossl.data.patches import PatchStream
from monossl.data.sources import load_image


def _expected(count, size=16, seed=0, preset="all", **over):
    st = PatchStream([load_image("builtin:astronaut")], make_config(preset, size=size, **over), seed=seed)
    return gen.to_uint8(st.batch(range(count)))


def _main(args, capsys):
    rc = cli.main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("fmt", ["png", "jpg", "npy"])
def test_generate_every_format(tmp_path, capsys, fmt):
    out = tmp_path / "p"
    rc, stdout, err = _main(["generate", "--size", "16", "--count", "20", "--seed", "0", "--out", str(out),
                             "--format", fmt, "--preview", str(tmp_path / "sheet.png"), "--batch-size", "8"],
                            capsys)
    assert rc == 0, err
    assert "wrote 20 patches" in stdout
    expect = _expected(20)
    if fmt == "npy":
        arr = np.load(out / "patches.npy")
        assert arr.dtype == np.uint8 and arr.shape == (20, 16, 16, 3)
        assert np.array_equal(arr, expect)
        assert not (out / ".patches.npy.partial").exists()
    else:
        files = sorted(os.listdir(out / "train" / "dummy"))
        assert files == [f"patch_{i:07d}.{fmt}" for i in range(20)]
        got = np.stack([np.asarray(Image.open(out / "train" / "dummy" / f).convert("RGB")) for f in files])
        assert got.shape == (20, 16, 16, 3)
        if fmt == "png":
            assert np.array_equal(got, expect)  # lossless
        else:
            assert np.abs(got.astype(int) - expect).mean() < 8
    meta = json.loads((out / "patches.json").read_text())
    assert meta["complete"] and meta["count"] == 20 and meta["seed"] == 0 and meta["format"] == fmt
    assert meta["config"]["size"] == 16 and meta["config"]["rotation_degrees"] == 30.0
    assert meta["images"][0]["spec"] == "builtin:astronaut" and len(meta["images"][0]["sha256"]) == 64
    assert meta["environment"]["monossl"] and meta["environment"]["torch"]
    # the contact sheet: the 20 patches shown 4x (64-pixel tiles), 8 a row, 2 white pixels apart
    sheet = Image.open(tmp_path / "sheet.png")
    assert sheet.mode == "RGB"
    sheet = np.asarray(sheet).astype(int)
    assert sheet.shape == (3 * 66 + 2, 8 * 66 + 2, 3)
    for k in (0, 9, 19):
        y, x = 2 + 66 * (k // 8), 2 + 66 * (k % 8)
        tile = expect[k].repeat(4, axis=0).repeat(4, axis=1)
        assert np.abs(sheet[y:y + 64, x:x + 64] - tile).max() <= 1, k  # rounding only
    assert (sheet[:2] == 255).all() and (sheet[:, 66:68] == 255).all()  # the white grid
    assert (sheet[2 + 2 * 66:, 2 + 4 * 66:] == 255).all()  # patches 20-23 do not exist: blank cells


def test_overrides_deka_and_fill(tmp_path, capsys):
    out = tmp_path / "p"
    rc, _, err = _main(["generate", "--image", "builtin:astronaut,builtin:coffee", "--image", "builtin:chelsea",
                        "--preset", "rotation", "--size", "16", "--count", "12", "--out", str(out),
                        "--format", "npy", "--fill", "none", "--set", "rotation_degrees=10",
                        "--set", "area_range=1/100,0.5", "--set", "scale=true"], capsys)
    assert rc == 0, err
    meta = json.loads((out / "patches.json").read_text())
    c = meta["config"]
    assert c["fill"] == "none" and c["rotation_degrees"] == 10.0 and c["scale"] is True
    assert c["area_range"] == [0.01, 0.5] and c["jitter_prob"] == 0.0
    assert [i["spec"] for i in meta["images"]] == ["builtin:astronaut", "builtin:coffee", "builtin:chelsea"]
    st = PatchStream([load_image(i["spec"]) for i in meta["images"]],
                     make_config("rotation", size=16, fill="none", rotation_degrees=10.0,
                                 area_range=(0.01, 0.5), scale=True), seed=0)
    assert np.array_equal(np.load(out / "patches.npy"), gen.to_uint8(st.batch(range(12))))


def _rerun_counting_renders(args, capsys) -> list[int]:
    """Run `generate` again and return the patch indices it rendered (a spy on PatchStream.batch)."""
    calls = []
    real_batch = PatchStream.batch

    def spy(self, indices):
        calls.extend(int(i) for i in indices)
        return real_batch(self, indices)

    PatchStream.batch = spy
    try:
        assert _main(args, capsys)[0] == 0
    finally:
        PatchStream.batch = real_batch
    return calls


def test_resume_skips_finished_files(tmp_path, capsys):
    out = tmp_path / "p"
    args = ["generate", "--size", "16", "--count", "30", "--out", str(out), "--format", "png",
            "--batch-size", "8", "--workers", "1"]  # in-process, so the spy sees every batch
    assert _main(args, capsys)[0] == 0
    folder = out / "train" / "dummy"
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}
    mtimes = {f: (folder / f).stat().st_mtime_ns for f in before}
    removed = [f"patch_{i:07d}.png" for i in (0, 7, 8, 29)]
    for f in removed:
        (folder / f).unlink()
    (folder / ".patch_0000007.png.tmp").write_bytes(b"half a file")  # left by a crash
    calls = _rerun_counting_renders(args, capsys)
    assert sorted(calls) == [0, 7, 8, 29]  # only the missing ones were rendered
    assert sorted(os.listdir(folder)) == sorted(before)  # temp file gone, all back
    for f in before:
        assert (folder / f).read_bytes() == before[f]
        if f not in removed:
            assert (folder / f).stat().st_mtime_ns == mtimes[f]  # not rewritten


def _interrupt_after(n_batches):
    real_batch = PatchStream.batch
    state = {"n": 0}

    def flaky(self, indices):
        state["n"] += 1
        if state["n"] > n_batches:
            raise KeyboardInterrupt
        return real_batch(self, indices)

    return real_batch, flaky


@pytest.mark.parametrize("fmt", ["npy", "jpg"])
def test_resume_after_interrupt(tmp_path, capsys, fmt):
    out = tmp_path / "p"
    args = ["generate", "--size", "16", "--count", "40", "--out", str(out), "--format", fmt,
            "--batch-size", "8", "--workers", "1"]
    real_batch, flaky = _interrupt_after(3)
    PatchStream.batch = flaky
    try:
        rc, _, err = _main(args, capsys)
    finally:
        PatchStream.batch = real_batch
    assert rc == 130 and "interrupted" in err
    meta = json.loads((out / "patches.json").read_text())
    assert meta["complete"] is False
    if fmt == "npy":
        assert not (out / "patches.npy").exists()
        assert json.loads((out / ".patches.npy.progress").read_text())["done"] == 24
    else:
        files = os.listdir(out / "train" / "dummy")
        assert 0 < len(files) < 40 and not any(f.endswith(".tmp") for f in files)
        for f in files:  # every file that exists is complete
            Image.open(out / "train" / "dummy" / f).load()
    calls = _rerun_counting_renders(args, capsys)
    if fmt == "npy":
        assert sorted(calls) == list(range(24, 40))
        assert np.array_equal(np.load(out / "patches.npy"), _expected(40))
        assert not (out / ".patches.npy.progress").exists()
    else:
        assert len(calls) < 40 and len(os.listdir(out / "train" / "dummy")) == 40
    assert json.loads((out / "patches.json").read_text())["complete"] is True


def test_refuses_a_directory_of_other_patches(tmp_path, capsys):
    out = tmp_path / "p"
    assert _main(["generate", "--size", "16", "--count", "4", "--out", str(out)], capsys)[0] == 0
    rc, _, err = _main(["generate", "--size", "16", "--count", "4", "--out", str(out), "--preset", "none"], capsys)
    assert rc == 2 and "different configuration" in err and "rotation_degrees" in err
    assert err.count("\n") == 1
    # more patches of the same configuration is fine
    assert _main(["generate", "--size", "16", "--count", "6", "--out", str(out)], capsys)[0] == 0
    assert len(os.listdir(out / "train" / "dummy")) == 6


def _bad_inputs(tmp_path):
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tiny)
    good = tmp_path / "good.png"
    Image.new("RGB", (80, 80), (10, 200, 10)).save(good)
    trunc = tmp_path / "trunc.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), np.uint8)).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:400])
    text = tmp_path / "text.png"
    text.write_text("hello")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    return [
        (["--image", str(tmp_path / "missing.png")], "not found"),
        (["--image", str(tmp_path)], "is a directory"),
        (["--image", str(text)], "not an image"),
        (["--image", str(trunc)], "truncated"),
        (["--image", str(tiny)], "at least 64 pixels"),
        (["--image", str(good), "--set", "initial_crop_fraction=0.1"], "at least 320 pixels"),
        (["--set", "area_range=0.5,0.1"], "inverted"),
        (["--set", "aspect_range=2,1"], "inverted"),
        (["--set", "jitter_prob=-1"], "probability"),
        (["--set", "nonsense=1"], "unknown patch parameter"),
        (["--set", "rotation_degrees=abc"], "expected float"),
        (["--count", "-5"], "--count must be >= 0"),
        (["--size", "0"], "argument --size: must be positive"),
        (["--preset", "everything"], "unknown preset"),
        (["--image", "builtin:nosuch"], "valid names"),
        (["--out", str(blocker / "sub")], "cannot write to output directory"),
        (["--format", "gif"], "invalid choice"),
    ]


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    for extra, words in _bad_inputs(tmp_path):
        out = tmp_path / "out"
        args = ["generate", "--size", "32", "--count", "5", "--out", str(out),
                "--preview", str(tmp_path / "prev.png")]
        if "--out" in extra:
            args = ["generate", "--size", "32", "--count", "5", "--preview", str(tmp_path / "prev.png")]
        rc, stdout, err = _main(args + extra, capsys)
        assert rc == 2, (extra, err)
        assert err.startswith("monossl: error: ") and err.count("\n") == 1, (extra, err)
        assert words in err, (extra, err)
        assert "Traceback" not in err
        assert not out.exists() and not (tmp_path / "prev.png").exists(), extra
