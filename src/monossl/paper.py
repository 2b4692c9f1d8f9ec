"""The paper's reference numbers (PAPER.md section 5), in one place.

Data only: the tables we put beside ours (`monossl reproduce`, `monossl report`) and how our
row names map to the paper's. Nothing here is measured by this project.
"""

from __future__ import annotations

#: CIFAR-10, BiGAN on one image with different augmentations, linear probes, top-1 (%)
CIFAR10_BIGAN: dict[str, dict[str, float]] = {
    "Fully supervised": {"conv1": 66.5, "conv2": 70.1, "conv3": 72.4, "conv4": 75.9},
    "Random features": {"conv1": 57.8, "conv2": 55.5, "conv3": 54.2, "conv4": 47.3},
    "No aug.": {"conv1": 57.9, "conv2": 56.2, "conv3": 54.2, "conv4": 47.8},
    "Jitter": {"conv1": 58.9, "conv2": 58.0, "conv3": 57.0, "conv4": 49.8},
    "Rotation": {"conv1": 61.4, "conv2": 58.8, "conv3": 56.1, "conv4": 47.5},
    "Scale": {"conv1": 67.9, "conv2": 69.3, "conv3": 67.9, "conv4": 59.1},
    "Rot. & jitter": {"conv1": 64.9, "conv2": 63.6, "conv3": 61.0, "conv4": 53.4},
    "Rot. & scale": {"conv1": 67.6, "conv2": 69.9, "conv3": 68.0, "conv4": 60.7},
    "Jitter & scale": {"conv1": 68.1, "conv2": 71.3, "conv3": 69.5, "conv4": 62.4},
    "All": {"conv1": 68.1, "conv2": 72.3, "conv3": 70.8, "conv4": 63.5},
}

#: our augmentation presets (data/patch_config.py) -> the paper's CIFAR-10 row names
PRESET_TO_PAPER = {
    "none": "No aug.", "jitter": "Jitter", "rotation": "Rotation", "scale": "Scale",
    "rotation+jitter": "Rot. & jitter", "rotation+scale": "Rot. & scale", "jitter+scale": "Jitter & scale",
    "all": "All",
}

#: ImageNet, AlexNet, fine-tuned with conv1-conv2 frozen, linear probes, 10 crops, top-1 (%) (Table 4)
IMAGENET_FINETUNE: dict[str, dict[str, float]] = {
    "Full supervision": {"conv1": 19.3, "conv2": 36.3, "conv3": 44.2, "conv4": 48.3, "conv5": 50.5},
    "BiGAN, image A": {"conv1": 22.5, "conv2": 37.6, "conv3": 44.2, "conv4": 47.6, "conv5": 48.3},
    "RotNet, image A": {"conv1": 22.0, "conv2": 38.2, "conv3": 44.8, "conv4": 49.2, "conv5": 51.8},
    "DeepCluster, image A": {"conv1": 21.8, "conv2": 35.9, "conv3": 43.6, "conv4": 48.8, "conv5": 50.4},
}

#: our rows of the fine-tuning table -> the paper's Table 4 row names
FINETUNE_ROW_TO_PAPER = {"supervised": "Full supervision", "bigan": "BiGAN, image A", "rotnet": "RotNet, image A",
                         "deepcluster": "DeepCluster, image A"}


def cifar10_row(row: str) -> str:
    """The paper's CIFAR-10 row name of one of our rows: supervised, random or a preset."""
    return {"supervised": "Fully supervised", "random": "Random features"}.get(row) or PRESET_TO_PAPER[row]

#: Asano & Saeed (ICLR 2023), "The Augmented Image Prior", abstract: a student distilled through one
#: image reaches 94% top-1 on CIFAR-10 (74% on CIFAR-100, 69% on ImageNet); its teacher is a far larger
#: network than our CIFAR trunk (about 95% on CIFAR-10)
AIP_CIFAR10_ONE_IMAGE = 94.0
AIP_CIFAR10_TEACHER = 95.0
