"""The validation split used for every screening number in docs/one_image.md: CIFAR-10 train split
once into 45,000 train / 5,000 validation (500 per class, seed 12345), written as an npz pair that
`--data cifar10:/work/val` reads. Run from the repository root with ../shared beside it."""
import os

import numpy as np

d = np.load("../shared/data/cifar10/cifar10_train.npz")
x, y = d["x"], d["y"]
rng = np.random.default_rng(12345)
val = np.concatenate([rng.permutation(np.where(y == c)[0])[:500] for c in range(10)])
mask = np.ones(len(y), bool)
mask[val] = False
os.makedirs("/work/val/cifar10", exist_ok=True)
np.savez("/work/val/cifar10/cifar10_train.npz", x=x[mask], y=y[mask])
np.savez("/work/val/cifar10/cifar10_test.npz", x=x[np.sort(val)], y=y[np.sort(val)])
