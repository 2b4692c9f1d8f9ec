"""The training loop: resume equals an uninterrupted run; RotNet's labels; methods really learn."""

import torch

from monossl.data.batches import TensorSource
from monossl.methods.augment import pad_crop_flip, random_resized_crop, rotate_four
from monossl.methods.rotnet import RotNet
from monossl.methods.supervised import Supervised
from monossl.models import build_trunk
from monossl.runs import read_jsonl
from monossl.train import LoopConfig, train

CPU = torch.device("cpu")


def _images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


def _small_trunk():
    torch.manual_seed(0)
    return build_trunk("cifar", widths=(8, 8, 16, 16))


def _run(tmp, method_cls, source, steps, stop_after=None, **kw):
    method = method_cls(_small_trunk(), steps, **kw)
    loop = LoopConfig(total_steps=steps, batch_size=16, seed=3, log_every=1, checkpoint_every=2, stop_after=stop_after)
    result = train(method, source, loop, tmp, CPU, progress=False)
    return method, result


def test_resume_equals_uninterrupted_run(tmp_path):
    source = TensorSource(_images(), seed=3)  # 96 images / batch 16: several epochs in 14 steps
    whole, _ = _run(tmp_path / "a", RotNet, source, 14)
    part, result = _run(tmp_path / "b", RotNet, source, 14, stop_after=5)
    assert not result["finished"] and result["step"] == 5
    resumed, result = _run(tmp_path / "b", RotNet, source, 14)  # a fresh process would do exactly this
    assert result["finished"]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    # the resumed log has every step exactly once, with the same losses
    log_a = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    log_b = [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert log_a == log_b and [s for s, _ in log_a] == list(range(1, 15))


def test_same_seed_same_weights_different_seed_different(tmp_path):
    source = TensorSource(_images(), seed=3)
    a, _ = _run(tmp_path / "a", RotNet, source, 3)
    b, _ = _run(tmp_path / "b", RotNet, source, 3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = RotNet(_small_trunk(), 3)
    train(c, TensorSource(_images(), seed=4), LoopConfig(total_steps=3, batch_size=16, seed=4), tmp_path / "c", CPU,
          progress=False)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_rotation_labels_match_rotated_images():
    # an asymmetric image: one bright pixel in the top-left corner
    img = torch.zeros(2, 1, 4, 4)
    img[:, :, 0, 0] = 1
    rotated, labels = rotate_four(img)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    corner = {0: (0, 0), 1: (3, 0), 2: (3, 3), 3: (0, 3)}  # where the pixel lands, counter-clockwise
    for sample, label in zip(rotated, labels.tolist()):
        r, c = corner[label]
        assert sample[0, r, c] == 1 and sample.sum() == 1
        # exact: a 90-degree rotation is a permutation of pixels, no interpolation
        assert set(sample.unique().tolist()) == {0.0, 1.0}


def test_rotnet_learns_rotation_of_asymmetric_images(tmp_path):
    # gradient images: orientation is obvious, so rotation accuracy must rise well above chance
    # a vertical ramp: horizontal flips (the method's own augmentation) leave it unchanged
    ramp = torch.linspace(0, 255, 32).view(1, 1, 32, 1).expand(64, 3, 32, 32)
    noise = torch.randint(0, 30, (64, 3, 32, 32))
    images = (ramp * torch.rand(64, 1, 1, 1) * 0.5 + ramp * 0.5 + noise).clamp(0, 255).to(torch.uint8)
    method, result = _run(tmp_path, RotNet, TensorSource(images, seed=0), 40)
    assert result["metrics"]["rotation_acc"] > 60


def test_supervised_fits_colour_classes(tmp_path):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (96,), generator=g)
    colours = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220]], dtype=torch.uint8)
    images = colours[labels].view(96, 3, 1, 1).expand(96, 3, 32, 32).contiguous()
    from monossl.methods.supervised import SupervisedConfig

    _, result = _run(tmp_path, Supervised, TensorSource(images, labels, seed=0), 30,
                     config=SupervisedConfig(num_classes=3))
    assert result["metrics"]["acc"] > 90


def test_pad_crop_flip_is_a_shifted_window():
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = pad_crop_flip(img, padding=2, flip_prob=0.0, generator=torch.Generator().manual_seed(1))
    padded = torch.nn.functional.pad(img, (2, 2, 2, 2))
    for b in range(2):  # each output is some 8x8 window of the padded image
        hits = [(y, x) for y in range(5) for x in range(5) if torch.equal(padded[b, :, y:y + 8, x:x + 8], out[b])]
        assert hits
    flipped = pad_crop_flip(img, padding=0, flip_prob=1.0)
    assert torch.equal(flipped, img.flip(3))


def test_random_resized_crop_full_scale_is_identity():
    img = torch.rand(3, 3, 16, 16)
    out = random_resized_crop(img, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=0.0)
    assert torch.allclose(out, img, atol=1e-5)
    flipped = random_resized_crop(img, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_prob=1.0)
    assert torch.allclose(flipped, img.flip(3), atol=1e-5)
