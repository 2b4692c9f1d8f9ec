"""Distillation through patches: the KL at temperature T, CutMix's proportions, procedural sources,
teachers (a supervised run, a local torchvision file), a tiny distillation that moves the student
towards its teacher, and a resumed distillation equal to an uninterrupted one."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from monossl.cli import main
from monossl.data.procedural import render
from monossl.data.sources import describe_source, load_image
from monossl.errors import UserError
from monossl.methods.augment import cutmix
from monossl.methods.losses import distillation_kl
from monossl.models.teachers import load_teacher

from conftest import is_drawn_figure


def test_kl_at_temperature_matches_a_hand_computation():
    student = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    teacher = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    t = 4.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = np.exp(np.array(t_row) / t) / np.exp(np.array(t_row) / t).sum()
        q = np.exp(np.array(s_row) / t) / np.exp(np.array(s_row) / t).sum()
        expected += float((p * np.log(p / q)).sum())
    expected = expected / 2 * t * t  # batch mean, times T^2
    got = distillation_kl(student, F.softmax(teacher / t, dim=1), t).item()
    assert got == pytest.approx(expected, rel=1e-5)
    assert distillation_kl(teacher, F.softmax(teacher / t, dim=1), t).item() == pytest.approx(0.0, abs=1e-6)


def test_cutmix_mixes_images_and_targets_in_the_same_proportion():
    torch.manual_seed(0)
    b, k = 16, 5
    images = torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1).expand(b, 3, 32, 32).contiguous()
    targets = F.one_hot(torch.arange(b) % k, k).float()
    mixed, mixed_targets, lam = cutmix(images, targets, alpha=1.0, generator=torch.Generator().manual_seed(1))
    own = (mixed == images).all(1).flatten(1).float().mean(1)  # pixels still the image's own
    partner = (mixed == images.flip(0)).all(1).flatten(1).float().mean(1)
    assert torch.allclose(own, lam) and torch.allclose(partner, 1 - lam)
    assert torch.allclose(mixed_targets, lam[:, None] * targets + (1 - lam[:, None]) * targets.flip(0))
    assert 0 < lam.min() and lam.max() <= 1 and lam.std() > 0.05  # boxes of varied size
    whole, whole_targets, lam1 = cutmix(images, targets, prob=0.0)
    assert torch.equal(whole, images) and torch.equal(whole_targets, targets) and bool((lam1 == 1).all())


def test_dead_leaves_is_deterministic_and_bad_specs_are_one_line_errors(tmp_path, capsys):
    spec = "procedural:dead-leaves:size=96:seed=3"
    a, b = load_image(spec), render(spec)
    assert a.shape == (3, 96, 96) and torch.equal(a, b)
    assert not torch.equal(a, render("procedural:dead-leaves:size=96:seed=4"))
    # discs of uniform colours: few distinct colours, covering everything, some large
    colours, counts = torch.unique(a.permute(1, 2, 0).reshape(-1, 3), dim=0, return_counts=True)
    assert 10 < len(colours) < 96 * 96 / 4 and counts.max() > 96 * 96 / 100
    assert describe_source(spec)["sha256"] == describe_source(spec)["sha256"]
    noise = render("procedural:noise:size=64:seed=1")
    assert noise.shape == (3, 64, 64) and 0.45 < noise.mean() < 0.55 and len(torch.unique(noise)) > 10000
    # patch i of a stream over it is the same in every stream
    out1, out2 = tmp_path / "p1", tmp_path / "p2"
    for out in (out1, out2):
        assert main(["generate", "--image", spec, "--count", "8", "--seed", "2", "--format", "npy",
                     "--out", str(out)]) == 0
    assert np.array_equal(np.load(out1 / "patches.npy"), np.load(out2 / "patches.npy"))
    capsys.readouterr()
    for bad, words in (("procedural:dead-leaves:rmin=5:rmax=2", "rmin <= rmax"),
                       ("procedural:dead-leaves:size=4", "size must be"),
                       ("procedural:dead-leaves:colour=red", "not KEY=VALUE"),
                       ("procedural:dead-leaves:seed=x", "wants a number"),
                       ("procedural:clouds", "unknown procedural image")):
        assert main(["generate", "--image", bad, "--count", "2", "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("monossl: error: ") and err.count("\n") == 1 and words in err, err
        assert not (tmp_path / "bad").exists()


def test_torchvision_teacher_from_a_local_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(model.state_dict(), tmp_path / "r18.pth")
    teacher = load_teacher(f"torchvision:resnet18:{tmp_path / 'r18.pth'}:size=64")
    assert teacher.num_classes == 10 and not any(p.requires_grad for p in teacher.parameters())
    x = torch.rand(2, 3, 32, 32)
    expected = model((F.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
                      - teacher.mean) / teacher.std)
    assert torch.allclose(teacher(x), expected, atol=1e-5)
    for bad in ("torchvision:resnet18", "torchvision:nosuchnet:x.pth", f"torchvision:resnet50:{tmp_path / 'r18.pth'}",
                f"torchvision:resnet18:{tmp_path / 'missing.pth'}"):
        with pytest.raises(UserError):
            load_teacher(bad)
    with pytest.raises(UserError, match="no classifier.pt"):
        load_teacher(str(tmp_path))


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory, cifar_subset_dir):
    run = tmp_path_factory.mktemp("teacher") / "sup"
    assert main(["pretrain", "--method", "supervised", "--data", f"cifar10:{cifar_subset_dir}", "--widths",
                 "8,8,16,16", "--steps", "60", "--batch-size", "32", "--out", str(run), "--quiet"]) == 0
    assert (run / "classifier.pt").exists()
    return run


def _distill(out, teacher, data_dir, *extra):
    return main(["distill", "--teacher", str(teacher), "--image", "builtin:astronaut", "--eval-data",
                 f"cifar10:{data_dir}", "--widths", "8,8,16,16", "--batch-size", "32", "--out", str(out),
                 "--quiet", *extra])


@pytest.mark.slow
def test_a_tiny_distillation_moves_the_student_towards_the_teacher(tmp_path, tiny_teacher, cifar_subset_dir):
    out = tmp_path / "student"
    assert _distill(out, tiny_teacher, cifar_subset_dir, "--steps", "80", "--eval-every", "40") == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"event": "student"' in line]
    assert [e["step"] for e in evals] == [0, 40, 80]
    assert evals[-1]["agreement"] > evals[0]["agreement"] + 10  # agreement with the teacher rises
    result = json.loads((out / "student.json").read_text())
    assert result["student"]["top1"] == evals[-1]["top1"] and result["teacher"]["top1"] > 10
    assert result["fraction_of_teacher"] == pytest.approx(result["student"]["top1"] / result["teacher"]["top1"],
                                                          abs=1e-4)
    assert (out / "trunk.pt").exists() and (out / "classifier.pt").exists()
    assert json.loads((out / "config.json").read_text())["method_config"]["temperature"] == 8.0


@pytest.mark.slow
def test_a_killed_distillation_resumes_bit_identically(tmp_path, tiny_teacher, cifar_subset_dir):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert _distill(whole, tiny_teacher, cifar_subset_dir, "--steps", "12") == 0
    assert _distill(parts, tiny_teacher, cifar_subset_dir, "--steps", "12", "--stop-after", "5") == 0
    assert not (parts / "trunk.pt").exists()
    assert _distill(parts, tiny_teacher, cifar_subset_dir, "--steps", "12", "--resume") == 0
    for name in ("trunk.pt", "classifier.pt"):
        a = torch.load(whole / name, weights_only=True)
        b = torch.load(parts / name, weights_only=True)
        sa, sb = a.get("state_dict", a.get("head")), b.get("state_dict", b.get("head"))
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_distillation_table_with_seeds_and_a_rerun_that_skips_finished_rows(tmp_path, cifar_subset_dir, capsys):
    out = tmp_path / "table"
    argv = ["reproduce", "distillation", "--budget", "smoke", "--data", f"cifar10:{cifar_subset_dir}", "--widths",
            "8,8,16,16", "--rows", "noise,teacher,all,dead-leaves", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    table = results["table"]
    assert list(table) == ["teacher", "all", "dead-leaves", "noise"]  # the table's own order
    for row in ("all", "dead-leaves", "noise"):  # two seeds each (smoke), their mean and spread
        seeds = table[row]["seeds"]
        assert list(seeds) == ["0", "1"] and table[row]["top1"] == pytest.approx(sum(seeds.values()) / 2, abs=0.01)
        assert table[row]["std"] is not None and 0 <= table[row]["agreement"] <= 100
    config = json.loads((out / "noise-seed1" / "config.json").read_text())
    assert config["image"] == ["procedural:noise"] and config["seed"] == 1 and config["method"] == "distill"
    md = (out / "table.md").read_text()
    assert "| dead-leaves |" in md and "94%" in md and is_drawn_figure(out / "table.png")
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before") == 7  # the teacher and six students
