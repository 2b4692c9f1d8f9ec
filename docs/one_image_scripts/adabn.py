"""Recalibrate a trunk's BatchNorm statistics on probe-train images (no labels), save as trunk.pt."""
import sys, torch
from monossl.models import load_trunk, build_trunk, save_trunk
from monossl.data.datasets import load_dataset
from monossl.pretrain import trunk_config_from
src, out = sys.argv[1], sys.argv[2]
if src.startswith("random"):
    torch.manual_seed(0); parts = src.split(":")
    trunk = build_trunk("cifar", **(trunk_config_from(parts[1], int(parts[2])) if len(parts) > 1 else {})); meta = {"method": "random"}
else:
    trunk, meta = load_trunk(src)
train = load_dataset("cifar10:/work/val", "train")
g = torch.Generator().manual_seed(1)
idx = torch.randperm(len(train), generator=g)[:10000]
for m in trunk.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
        m.reset_running_stats(); m.momentum = None
trunk.train()
with torch.no_grad():
    for i in range(0, len(idx), 500):
        trunk(train.images[idx[i:i+500]].float() / 255)
save_trunk(out + "/trunk.pt", trunk.eval(), {**meta, "adabn": True})
