"""Neural style transfer (Gatys et al.) with any trunk (`monossl stylize`).

The stylised image x (pixels in [0, 1], initialised from the content image) minimises

    content_weight * |F_c(x) - F_c(content)|^2 / |F_c(content)|^2
      + style_weight * sum_l w_l * |G_l(x) - G_l(style)|^2 / |G_l(style)|^2

where F_l is the activation of tap l (after its ReLU, `trunk.taps`), G_l = F F^T / (C H W) its
Gram matrix, w_l = 1 / (number of style taps), |.| the Frobenius norm. Both losses are
*relative* errors, so they mean the same for every trunk whatever the scale of its activations
(a random trunk's and a trained one's differ by orders of magnitude), and the default weights
carry over: the style loss of the content image itself is typically 0.3 to 1. L-BFGS on the pixels, in rounds of 20
iterations with the pixels clamped to [0, 1] between rounds.

The trunk is copied, put in eval mode (BatchNorm uses its running statistics) and frozen;
by default its max-pools are replaced by average pools of the same size (Gatys et al.'s
trick: smoother gradients, fewer checkerboard artefacts; `--pool max` keeps them).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from monossl.errors import UserError
from monossl.models import Trunk
from monossl.runs import atomic_path
from monossl.viz.figures import new_figure

DEFAULT_STYLE_TAPS = {"cifar": ("conv1", "conv2", "conv3", "conv4")}
DEFAULT_CONTENT_TAP = {"cifar": "conv3"}
ROUND = 20  # L-BFGS iterations between clamps


def default_taps(trunk: Trunk) -> tuple[list[str], str]:
    """(style taps, content tap): conv1..conv4 and conv3 for the CIFAR trunk; for AlexNets
    conv1..conv5 and conv4."""
    names = list(trunk.tap_names)
    style = list(DEFAULT_STYLE_TAPS.get(trunk.arch, names[:5]))
    content = DEFAULT_CONTENT_TAP.get(trunk.arch, names[min(3, len(names) - 1)])
    return style, content


def prepare_trunk(trunk: Trunk, pool: str = "avg"):
    """A frozen eval-mode copy of `trunk`; pool='avg' swaps MaxPool2d for AvgPool2d."""
    if pool not in ("avg", "max"):
        raise UserError(f"--pool must be avg or max, not {pool!r}")
    net = copy.deepcopy(trunk).eval().requires_grad_(False)
    if pool == "avg":
        for parent in net.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.MaxPool2d):
                    setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                       ceil_mode=child.ceil_mode))
    for m in net.modules():  # in-place ReLUs would overwrite taps that the loss still needs
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return net


def gram(f: torch.Tensor) -> torch.Tensor:
    """Gram matrices (B, C, C) of activations (B, C, H, W), divided by C * H * W."""
    b, c, h, w = f.shape
    f = f.reshape(b, c, h * w)
    return f @ f.transpose(1, 2) / (c * h * w)


def resize_longer(img: torch.Tensor, size: int) -> torch.Tensor:
    """Resize (3, H, W) so that its longer side is `size` (antialiased bilinear)."""
    h, w = img.shape[-2:]
    s = size / max(h, w)
    hw = (max(1, round(h * s)), max(1, round(w * s)))
    if hw == (h, w):
        return img.clone()
    out = F.interpolate(img[None], size=hw, mode="bilinear", align_corners=False, antialias=s < 1)
    return out[0].clamp(0, 1)


def load_pair(content: str | Path | torch.Tensor, style: str | Path | torch.Tensor, size: int) -> tuple[torch.Tensor,
              torch.Tensor]:
    """Content and style as (3, H, W) in [0, 1], longer side `size`; specs or tensors."""
    from monossl.data.sources import load_image

    if size < 8:
        raise UserError(f"--size must be at least 8 pixels, not {size}")
    c = load_image(content) if not isinstance(content, torch.Tensor) else content
    s = load_image(style) if not isinstance(style, torch.Tensor) else style
    return resize_longer(c, size), resize_longer(s, size)


def stylize(trunk: Trunk, content: str | Path | torch.Tensor, style: str | Path | torch.Tensor, size: int = 256,
            steps: int = 100, style_weight: float = 100.0,
            content_weight: float = 1.0, style_taps: Sequence[str] | None = None, content_tap: str | None = None,
            pool: str = "avg",
            init: str = "content", seed: int = 0, device: str | torch.device = "cpu", max_seconds: float | None = None,
            log: Callable[[str], object] = print) -> dict:
    """Gatys style transfer; returns {"image": (3, H, W) in [0, 1], "style_loss": [start, end],
    "content_loss": [start, end], "loss": [start, end], "iterations", "evaluations", "seconds",
    "history": [(evaluation, style_loss, content_loss)], "style_taps", "content_tap"}.

    content / style: (3, H, W) tensors in [0, 1] or image specs (paths, builtin:NAME), resized so
    their longer side is `size`. steps: L-BFGS iterations (about one trunk forward+backward each).
    max_seconds: also stop after the round (20 iterations) that passes this wall-clock time.
    style_loss is the unweighted (relative) style term, content_loss the content term, loss the
    weighted total (see the module docstring).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    content, style = load_pair(content, style, size)
    d_style, d_content = default_taps(trunk)
    style_taps = list(style_taps or d_style)
    content_tap = content_tap or d_content
    unknown = [t for t in [*style_taps, content_tap] if t not in trunk.tap_names]
    if unknown:
        raise UserError(f"unknown tap(s) {', '.join(unknown)}; {trunk.arch} has {', '.join(trunk.tap_names)}")
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if init not in ("content", "noise"):
        raise UserError(f"--init must be content or noise, not {init!r}")
    net = prepare_trunk(trunk, pool).to(device)
    taps = list(dict.fromkeys([*style_taps, content_tap]))
    w_l = 1.0 / len(style_taps)

    with torch.no_grad():
        content_x = content[None].to(device)
        target_content = net.taps(content_x, [content_tap])[content_tap]
        s_feats = net.taps(style[None].to(device), style_taps)
        target_grams = {t: gram(s_feats[t]) for t in style_taps}
        style_norms = {t: target_grams[t].pow(2).sum().clamp_min(1e-30) for t in style_taps}
        content_norm = target_content.pow(2).sum().clamp_min(1e-30)
    if init == "content":
        x = content_x.clone()
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.rand(content_x.shape, generator=g).to(device)
    x.requires_grad_(True)

    def losses(img: torch.Tensor):
        feats = net.taps(img, taps)
        s = sum(w_l * (gram(feats[t]) - target_grams[t]).pow(2).sum() / style_norms[t] for t in style_taps)
        c = (feats[content_tap] - target_content).pow(2).sum() / content_norm
        return s, c

    history: list[tuple[int, float, float]] = []
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=ROUND, history_size=50,
                                  tolerance_grad=0.0, tolerance_change=0.0)

    def closure():
        optimizer.zero_grad()
        s, c = losses(x)
        loss = style_weight * s + content_weight * c
        loss.backward()
        history.append((len(history), s.item(), c.item()))
        return loss

    with torch.no_grad():
        s0, c0 = (float(v) for v in losses(x))
    log(f"  style loss at start {s0:.4g} (content loss {c0:.4g}); {size} px, {steps} L-BFGS iterations, "
        f"style taps {','.join(style_taps)}, content tap {content_tap}")
    done = 0
    while done < steps:
        n = min(ROUND, steps - done)
        optimizer.param_groups[0]["max_iter"] = n
        optimizer.param_groups[0]["max_eval"] = n * 5 // 4 + 1
        optimizer.step(closure)
        done += n
        with torch.no_grad():
            x.clamp_(0, 1)
        if not torch.isfinite(x).all():
            raise UserError("style transfer diverged (non-finite pixels); lower --style-weight")
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            log(f"  stopped after {done} iterations: --max-seconds {max_seconds:g} passed")
            break
    with torch.no_grad():
        s1, c1 = (float(v) for v in losses(x))
    seconds = time.perf_counter() - t0
    ratio = s0 / s1 if s1 > 0 else float("inf")
    log(f"  style loss at end {s1:.4g} ({ratio:.1f}x lower; content loss {c1:.4g}); "
        f"{len(history)} evaluations in {seconds:.1f} s")
    return {
        "image": x.detach()[0].clamp(0, 1).cpu(),
        "style_loss": [s0, s1],
        "content_loss": [c0, c1],
        "loss": [style_weight * s0 + content_weight * c0, style_weight * s1 + content_weight * c1],
        "style_ratio": ratio,
        "iterations": min(done, steps),
        "evaluations": len(history),
        "seconds": seconds,
        "history": history,
        "style_taps": style_taps,
        "content_tap": content_tap,
        "content": content,
        "style": style,
    }


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def image_format(out: str | Path) -> str:
    """PIL's format of an image file from its suffix (.png, .jpg, .jpeg); anything else is refused."""
    fmt = IMAGE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise UserError(f"--out {out}: write a .png or .jpg file")
    return fmt


def write_image(img: torch.Tensor, out: str | Path) -> Path:
    """Write a (3, H, W) [0, 1] tensor as an 8-bit PNG/JPEG, atomically."""
    from PIL import Image

    out = Path(out)
    fmt = image_format(out)
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255 + 0.5).astype("uint8")
    try:
        with atomic_path(out) as tmp:
            Image.fromarray(arr).save(tmp, format=fmt)
    except OSError as exc:
        raise UserError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out


def compare_figure(content: torch.Tensor, style: torch.Tensor, results: list[tuple[str, dict]],
                   title: str | None = None):
    """Content, style, then one stylised image per network, each labelled."""
    n = 2 + len(results)
    fig = new_figure((2.4 * n, 2.9))
    axes = fig.subplots(1, n, squeeze=False)[0]
    panels = [("content", content), ("style", style)]
    panels += [(f"{label}\nstyle loss /{r['style_ratio']:.0f}", r["image"]) for label, r in results]
    for ax, (label, img) in zip(axes, panels):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
