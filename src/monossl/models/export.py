"""A ResNet-18 trunk's weights for the matching library model (torchvision or timm), and the lines
that load them.

Our `resnet18` / `resnet18-cifar` trunks are built from torchvision's own modules, so their
weights map one to one onto `torchvision.models.resnet18` (`resnet.torchvision_state_dict`);
timm's `resnet18` uses the same parameter names (tested). The library model is adapted as the
trunk was built: for the CIFAR stem, conv1 becomes a 3x3 stride-1 conv and the max-pool goes;
there is no classifier (torchvision: fc = Identity; timm: num_classes=0), so loading is strict
and the model returns the trunk's 512-d features. The trunk normalised its input itself; the
library model wants normalised input (`MEAN`, `STD`). Other trunks have no library twin.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from monossl.errors import UserError
from monossl.models.resnet import ResNet18, torchvision_state_dict
from monossl.models.trunks import MEAN, STD, Trunk

FORMATS = ("torchvision", "timm")
EXPORTABLE = ("resnet18-cifar", "resnet18")
TIMM_REQUIREMENT = "timm>=1.0"


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; choose from {', '.join(FORMATS)}")


def check_exportable(trunk: Trunk, where: str) -> None:
    """Refuse (one line naming `where`) a trunk no library model can hold."""
    if trunk.arch not in EXPORTABLE:
        raise UserError(f"{where}: {trunk.arch} trunks have no torchvision/timm twin; "
                        f"export takes {', '.join(EXPORTABLE)} trunks")
    if trunk.sobel is not None:
        raise UserError(f"{where}: this {trunk.arch} trunk has a Sobel front-end (2 input channels), "
                        "which no torchvision/timm model has; export takes trunks pretrained without --sobel")


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError(f"--format timm needs the timm package: pip install '{TIMM_REQUIREMENT}'") from None
    return timm


def library_version(fmt: str) -> str:
    check_format(fmt)
    if fmt == "timm":
        return _timm().__version__
    import torchvision

    return torchvision.__version__


def library_model(arch: str, fmt: str) -> nn.Module:
    """The library's ResNet-18, adapted as `loading_snippet` says (what `export_state_dict` loads into)."""
    check_format(fmt)
    if fmt == "timm":
        model = _timm().create_model("resnet18", pretrained=False, num_classes=0)
    else:
        import torchvision

        model = torchvision.models.resnet18(weights=None)
        model.fc = nn.Identity()
    if arch == "resnet18-cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def export_state_dict(trunk: Trunk, fmt: str) -> dict[str, torch.Tensor]:
    """The trunk's weights under the library model's names, checked by a strict load into it."""
    check_exportable(trunk, "trunk")
    assert isinstance(trunk, ResNet18)  # the exportable archs are resnet18's
    weights = {k: v.detach().cpu().clone() for k, v in torchvision_state_dict(trunk).items()}
    model = library_model(trunk.arch, fmt)
    try:
        model.load_state_dict(weights)  # strict: a missing, extra or misshapen key is a bug of ours
    except RuntimeError as exc:
        raise RuntimeError(f"{trunk.arch} weights do not fit {fmt}'s resnet18: {exc}") from None
    return weights


def loading_snippet(arch: str, fmt: str, path: str = "weights.pth") -> str:
    """The Python lines that build the adapted library model and load the exported weights."""
    check_format(fmt)
    size = 32 if arch == "resnet18-cifar" else 224
    if fmt == "timm":
        lines = ["import timm", "import torch", "",
                 'model = timm.create_model("resnet18", pretrained=False, num_classes=0)']
    else:
        lines = ["import torch", "import torchvision", "",
                 "model = torchvision.models.resnet18(weights=None)",
                 "model.fc = torch.nn.Identity()"]
    if arch == "resnet18-cifar":
        lines += ["model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)",
                  "model.maxpool = torch.nn.Identity()"]
    lines += [f"model.load_state_dict(torch.load({str(path)!r}, weights_only=True))",
              "model.eval()",
              f"# input: RGB in [0, 1], {size} px, normalised with mean {MEAN} and std {STD};",
              "# model(x) is the 512-d global average of layer4"]
    return "\n".join(lines) + "\n"
