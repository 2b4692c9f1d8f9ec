"""Source images: every Pillow mode as RGB in [0, 1], built-ins, and one-line errors."""

import numpy as np
import pytest
import torch
from PIL import Image

from monossl import cli
from monossl.data import sources
from monossl.data.sources import BUILTINS, DEFAULT_IMAGE, load_image, load_images
from monossl.errors import UserError


def _save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_rgb_roundtrip_exact(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    t = load_image(_save(tmp_path, Image.fromarray(arr), "a.png"))
    assert t.dtype == torch.float32 and t.shape == (3, 20, 30)
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_greyscale_and_palette(tmp_path):
    grey = np.arange(600, dtype=np.uint8).reshape(20, 30)
    t = load_image(_save(tmp_path, Image.fromarray(grey, "L"), "g.png"))
    assert t.shape == (3, 20, 30)
    assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])
    assert torch.allclose(t[0], torch.from_numpy(grey).float() / 255)
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    pal = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    t = load_image(_save(tmp_path, pal, "p.png"))
    expect = torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1).float() / 255
    assert torch.equal(t, expect)


def test_alpha_is_composited_over_white(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red
    arr[0, :, 3] = 0  # row 0 fully transparent -> white
    arr[1, :, 3] = 255  # row 1 opaque -> red
    arr[2, :, 3] = 128  # row 2 half -> pink
    t = load_image(_save(tmp_path, Image.fromarray(arr, "RGBA"), "a.png"))
    assert torch.allclose(t[:, 0], torch.ones(3, 4))
    assert torch.allclose(t[:, 1], torch.tensor([1.0, 0, 0]).view(3, 1).expand(3, 4))
    a = 128 / 255
    assert torch.allclose(t[:, 2], torch.tensor([1.0, 1 - a, 1 - a]).view(3, 1).expand(3, 4), atol=1e-6)
    la = Image.fromarray(np.stack([np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert torch.allclose(load_image(_save(tmp_path, la, "la.png")), torch.ones(3, 4, 4))


def test_sixteen_bit_is_scaled_by_65535(tmp_path):
    arr = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(3, axis=0)
    img = Image.fromarray(arr)
    assert img.mode.startswith("I;16")
    t = load_image(_save(tmp_path, img, "d.png"))
    assert t.shape == (3, 3, 4)
    assert torch.allclose(t[0, 0], torch.tensor([0.0, 32768 / 65535, 1.0, 1000 / 65535]), atol=1e-6)
    assert torch.equal(t[0], t[2])


def test_cmyk(tmp_path):
    img = Image.new("CMYK", (8, 6), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow: red
    t = load_image(_save(tmp_path, img, "c.tif"))
    assert t.shape == (3, 6, 8)
    assert torch.allclose(t[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=0.02)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white in the stored pixels
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "e.jpg"
    img.save(path, exif=exif, quality=100)
    t = load_image(path)
    assert t.shape == (3, 40, 20)  # displayed portrait
    assert t[:, :20].mean() > 0.9 and t[:, 20:].mean() < 0.1  # left half -> top half


def test_builtins_load_offline_and_match_table():
    for name, info in BUILTINS.items():
        t = load_image(f"builtin:{name}")
        assert t.shape[0] == 3 and (t.shape[2], t.shape[1]) == tuple(info["size"]), name
        assert 0.0 <= float(t.min()) and float(t.max()) <= 1.0
        assert info["licence"] and info["description"]
    assert DEFAULT_IMAGE in BUILTINS
    assert len(load_images(["builtin:coffee", "builtin:chelsea"])) == 2


def test_split_specs():
    assert sources.split_specs(["a.png", "b.png,builtin:coffee", " c.jpg "]) == [
        "a.png", "b.png", "builtin:coffee", "c.jpg"]


def test_images_command_lists_builtins(capsys):
    assert cli.main(["images"]) == 0
    out = capsys.readouterr().out
    for name in BUILTINS:
        assert f"builtin:{name}" in out
    assert f"builtin:{DEFAULT_IMAGE}*" in out
    assert "512x512" in out and "public domain" in out


def test_builtin_table_sizes_are_the_loaded_sizes():
    rows = sources.builtin_table()
    assert [r["name"] for r in rows] == [f"builtin:{name}" for name in BUILTINS]
    assert [r["name"] for r in rows if r["default"]] == [f"builtin:{DEFAULT_IMAGE}"]
    loaded = sources.builtin_table(check=True)
    assert [(r["width"], r["height"]) for r in loaded] == [(r["width"], r["height"]) for r in rows]


@pytest.fixture
def bad_files(tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    text = tmp_path / "notes.png"
    text.write_text("this is not an image\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    return {
        "missing": (tmp_path / "nope.png", "not found"),
        "directory": (folder, "is a directory"),
        "not an image": (text, "not an image"),
        "truncated": (truncated, "truncated"),
        "unknown builtin": ("builtin:nosuch", "valid names: astronaut"),
    }


def test_bad_images_raise_one_line_user_errors(bad_files):
    for case, (spec, words) in bad_files.items():
        with pytest.raises(UserError) as info:
            load_image(spec)
        msg = str(info.value)
        assert words in msg and "\n" not in msg, (case, msg)
