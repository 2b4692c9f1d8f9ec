"""BiGAN (Donahue et al., 2017): an encoder E, a generator G and a joint discriminator D(x, z).

D tells real pairs (x, E(x)) from generated pairs (G(z), z); E and G are trained together to fool
it. At the optimum E inverts G, so E (the trunk we probe) must describe images well enough to be
told apart from the latent code that made them (PAPER.md §2; the paper's CIFAR-10 "MonoGAN": 32 px).

Networks (docs/bigan.md): E = the trunk + `Linear(feature_dim, latent_dim)` on the batch (RGB in
[0, 1]) resized to `encoder_size` (32 px for the CIFAR trunk, Donahue et al.'s 112 px for AlexNet);
G and D are `models.gan`'s DCGAN networks at `image_size`; z is 200-d, uniform in [-1, 1].

Losses (non-saturating): D minimises BCE(D(x, E(x)), 1) + BCE(D(G(z), z), 0);
E and G minimise BCE(D(x, E(x)), 0) + BCE(D(G(z), z), 1) (the labels swapped).
Adam lr 2e-4, betas (0.5, 0.999) for D and for (E, G); constant lr for the first half of
training, then linear decay to 0 (Donahue et al.'s schedule; `lr_decay_start`).

Each step logs d_real = mean D(x, E(x)) and d_fake = mean D(G(z), z) (from D's pass before its
update), the losses, lr and recon_ratio = mean ||x - G(E(x))|| / mean ||x - G(E(x'))||, x' the
batch rolled by one (1: G(E(x)) knows nothing of x; lower: E and G invert each other).

BiGAN keeps its own `step` (two optimisers, two backward passes). Under torchrun E, G and D each run
through data parallelism; the E/G update goes through D itself with D's parameters frozen, so D's
data-parallel wrapper is never waiting for gradients the E/G loss should not give it.

Stop rules: NaN/inf losses stop the run in the training loop (train.py); when the
discriminator wins outright (d_real > 1 - margin and d_fake < margin) for `d_win_patience`
consecutive steps, `step` raises TrainingStopped; either way last.pt stays the last good checkpoint.

Sample grids (real patches / G(E(x)) / G(z) for a fixed z, in eval mode) go to run_dir/samples/:
`end_epoch` (finite sources) and `after_step` (every `sample_every` steps and at the last step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image

from monossl.distributed import global_count, local_rows
from monossl.errors import TrainingStopped
from monossl.methods.augment import random_resized_crop
from monossl.methods.base import Method, RunDefaults, set_lr
from monossl.models.gan import Discriminator, Generator
from monossl.models.trunks import Trunk
from monossl.runs import atomic_path


@dataclass
class BiGANConfig:
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    latent_dim: int = 200
    #: side of G's output and D's input: 32 for the CIFAR trunk, 64 for AlexNet (None: from the trunk)
    image_size: int | None = None
    #: side of E's input: the trunk's input size (32) for the CIFAR trunk, 112 for AlexNet (None: from the trunk)
    encoder_size: int | None = None
    g_width: int = 64  # channels of G's last hidden block (x2 per block towards z)
    d_width: int = 64  # channels of D's first conv (x2 per block)
    d_dropout: float = 0.2
    #: fraction of training after which lr decays linearly to 0 (1.0: constant lr)
    lr_decay_start: float = 0.5
    #: the method's own random-resized crop (area range) before E/D; None: horizontal flip only,
    #: so that the patch stream's preset alone decides the scale augmentation (the ablation's point)
    crop_scale: tuple[float, float] | None = None
    flip_prob: float = 0.5
    #: D "wins outright" when mean D(x,E(x)) > 1 - d_win_margin and mean D(G(z),z) < d_win_margin
    d_win_margin: float = 0.01
    #: ... for this many consecutive steps: the run stops (0: never)
    d_win_patience: int = 200
    sample_every: int = 500  # steps between sample grids of `after_step` (0: only at the end)
    sample_count: int = 16  # images per row of a sample grid


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=images.shape[-1] > size)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits.float(), target))


class BiGAN(Method):
    name = "bigan"
    Config = BiGANConfig
    defaults = RunDefaults(steps=1500, batch_size=64)

    def __init__(self, trunk: Trunk, total_steps: int, config: BiGANConfig | None = None):
        super().__init__(trunk, total_steps)
        c = config or BiGANConfig()
        # Sizes filled in place, so that the config pretrain writes to config.json says what ran:
        # the 32-px MonoGAN for the CIFAR trunk; for AlexNet, Donahue et al.'s E at 112 px, G and D at 64 px
        if c.image_size is None:
            c.image_size = 32 if trunk.input_size <= 64 else 64
        if c.encoder_size is None:
            c.encoder_size = trunk.input_size if trunk.input_size <= 64 else 112
        self.config = c
        self.head = nn.Linear(trunk.feature_dim, c.latent_dim)  # E = head(trunk(x))
        self.generator = Generator(c.latent_dim, c.image_size, c.g_width)
        self.discriminator = Discriminator(c.latent_dim, c.image_size, c.d_width, c.d_dropout)
        beta1, beta2 = c.betas  # a pair (a --method-option may give it as a list)
        betas = (beta1, beta2)
        self._opt_d = torch.optim.Adam(self.discriminator.parameters(), lr=c.lr, betas=betas)
        eg = list(self.trunk.parameters()) + list(self.head.parameters()) + list(self.generator.parameters())
        self._opt_eg = torch.optim.Adam(eg, lr=c.lr, betas=betas)
        self.d_win_streak = 0
        self._grid_real: torch.Tensor | None = None  # the last batch's first images, for sample grids

    # ------------------------------------------------------------------ pieces

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"d": self._opt_d, "eg": self._opt_eg}

    def encode(self, images01: torch.Tensor, parallel: bool = False) -> torch.Tensor:
        """E: images in [0, 1] (any size; resized to `encoder_size`) -> latent codes (through data
        parallelism when training)."""
        encoder = self.parallel(self.trunk, self.head) if parallel else nn.Sequential(self.trunk, self.head)
        return encoder(_resize(images01, self.config.encoder_size))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.encode(images01)

    def sample_latent(self, n: int, device: torch.device | str | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """z ~ U[-1, 1]^latent_dim (drawn for the global batch under torchrun: each rank keeps its rows)."""
        z = local_rows(torch.rand(global_count(n), self.config.latent_dim, generator=generator))
        return (z * 2 - 1).to(device if device is not None else self.head.weight.device)

    def lr_at(self, step: int) -> float:
        start = self.config.lr_decay_start * self.total_steps
        if step < start or self.config.lr_decay_start >= 1:
            return self.config.lr
        return self.config.lr * max(0.0, (self.total_steps - step) / max(1.0, self.total_steps - start))

    def augment(self, images01: torch.Tensor) -> torch.Tensor:
        c = self.config
        if c.crop_scale is not None:
            return random_resized_crop(images01, images01.shape[-1], scale=c.crop_scale, flip_prob=c.flip_prob)
        if c.flip_prob > 0:
            flip = local_rows(torch.rand(global_count(images01.shape[0]))) < c.flip_prob
            images01 = torch.where(flip.to(images01.device)[:, None, None, None], images01.flip(-1), images01)
        return images01

    # ------------------------------------------------------------------ one update

    def step(self, batch: dict, step: int) -> dict[str, float]:
        c = self.config
        x01 = self.augment(batch["images"])
        x = _resize(x01, c.image_size) * 2 - 1  # D's and G's domain: [-1, 1] at image_size
        b = x.shape[0]
        lr = self.lr_at(step)
        set_lr(self._opt_d, lr)
        set_lr(self._opt_eg, lr)

        z = self.sample_latent(b, x.device)
        ex = self.encode(x01, parallel=True)  # E(x)
        gz = self.parallel(self.generator)(z)  # G(z)

        # discriminator: real pairs (x, E(x)) -> 1, generated pairs (G(z), z) -> 0
        logits = self.parallel(self.discriminator)(torch.cat([x, gz.detach()]), torch.cat([ex.detach(), z]))
        real_logit, fake_logit = logits[:b], logits[b:]
        d_loss = _bce(real_logit, 1.0) + _bce(fake_logit, 0.0)
        self._opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        self._opt_d.step()

        # encoder + generator: the labels swapped (non-saturating), through the updated D, which
        # takes no gradient here
        self.discriminator.requires_grad_(False)
        try:
            logits = self.discriminator(torch.cat([x, gz]), torch.cat([ex, z]))
        finally:
            self.discriminator.requires_grad_(True)
        e_loss = _bce(logits[:b], 0.0)
        g_loss = _bce(logits[b:], 1.0)
        eg_loss = e_loss + g_loss
        self._opt_eg.zero_grad(set_to_none=True)
        eg_loss.backward()
        self._opt_eg.step()

        with torch.no_grad():
            d_real = torch.sigmoid(real_logit.float()).mean().item()
            d_fake = torch.sigmoid(fake_logit.float()).mean().item()
            recon = self.generator(ex.detach()).float()
            xf = x.float()
            own = (xf - recon).flatten(1).norm(dim=1).mean()
            other = (xf - recon.roll(1, 0)).flatten(1).norm(dim=1).mean()
            recon_ratio = (own / other.clamp_min(1e-12)).item() if b > 1 else float("nan")
            self._grid_real = x01[: c.sample_count].detach().float().cpu().clone()

        self._check_discriminator(d_real, d_fake, step)
        return {"d_real": d_real, "d_fake": d_fake, "d_loss": d_loss.item(), "g_loss": g_loss.item(),
                "e_loss": e_loss.item(), "eg_loss": eg_loss.item(), "recon_ratio": recon_ratio, "lr": lr}

    def _check_discriminator(self, d_real: float, d_fake: float, step: int) -> None:
        c = self.config
        wins = d_real > 1 - c.d_win_margin and d_fake < c.d_win_margin
        self.d_win_streak = self.d_win_streak + 1 if wins else 0
        if c.d_win_patience and self.d_win_streak >= c.d_win_patience:
            first = step - self.d_win_streak + 1
            raise TrainingStopped(
                f"training stopped: the BiGAN discriminator has won outright for {self.d_win_streak} consecutive "
                f"steps (steps {first}-{step}: mean D(x,E(x)) > {1 - c.d_win_margin:g} and mean D(G(z),z) < "
                f"{c.d_win_margin:g}; now {d_real:.4f} and {d_fake:.4f}), so E and G no longer learn. The run "
                f"directory's last.pt is the last checkpoint written before this step; try a lower --lr or "
                f"another --seed rather than --resume, which would replay the same steps")

    # ------------------------------------------------------------------ checkpoint state

    def extra_state(self) -> dict:
        return {"d_win_streak": self.d_win_streak}

    def load_extra_state(self, state: dict) -> None:
        self.d_win_streak = int(state.get("d_win_streak", 0))

    # ------------------------------------------------------------------ sample grids

    @torch.no_grad()
    def sample_grid(self, real01: torch.Tensor | None = None, n: int | None = None, seed: int = 0) -> torch.Tensor:
        """(3n, 3, S, S) in [0, 1]: n real patches, their reconstructions G(E(x)), and G(z) for a
        fixed z (seeded, so grids of one run are comparable over time). Eval mode; training mode
        is restored afterwards (no BatchNorm statistic is touched)."""
        n = n or self.config.sample_count
        device = self.head.weight.device
        if real01 is None:
            real01 = self._grid_real
        if real01 is None:
            raise ValueError("no real images yet: call step() first or pass real01")
        real01 = real01[:n].to(device).float()
        n = real01.shape[0]
        was_training = self.training
        self.eval()
        try:
            recon = self.generator(self.encode(real01))
            fake = self.generator(self.sample_latent(n, device, torch.Generator().manual_seed(seed)))
        finally:
            self.train(was_training)
        real = _resize(real01, self.config.image_size)
        return torch.cat([real, (recon.float() + 1) / 2, (fake.float() + 1) / 2]).clamp(0, 1).cpu()

    def write_samples(self, path: str | Path) -> Path | None:
        """Save the sample grid (rows: real, G(E(x)), G(z)) as a PNG, atomically."""
        if self._grid_real is None:
            return None
        grid = self.sample_grid()
        n = grid.shape[0] // 3
        grid = make_grid(grid, nrow=n, padding=1, pad_value=1.0)
        scale = min(4, max(1, 256 // max(1, grid.shape[-1] // n)))  # small patches: enlarge (nearest) to be visible
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
        with atomic_path(path) as tmp:
            save_image(grid, tmp, format="PNG")
        return Path(path)

    def end_epoch(self, epoch: int, run_dir: str | Path) -> None:
        self.write_samples(Path(run_dir) / "samples" / f"epoch{epoch:04d}.png")

    def after_step(self, done: int, run_dir: str | Path) -> None:
        """Every `sample_every` steps and at the last step: run_dir/samples/stepNNNNNN.png."""
        every = self.config.sample_every
        if (every and done % every == 0) or done == self.total_steps:
            self.write_samples(Path(run_dir) / "samples" / f"step{done:06d}.png")
