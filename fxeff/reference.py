"""The reference models: small trained CNNs of three families (VGG, ResNet, MobileNetV2) on Fashion-MNIST
and Cluttered Fashion-MNIST, whose checkpoints ship with fxeff, so every pass's accuracy cost is measured
on real trained weights, offline.

``build(arch, dataset)`` makes the architecture; ``load(arch, dataset)`` adds its committed weights
(``fxeff/checkpoints/<arch>-<dataset>.pt``, a plain state_dict read with ``weights_only=True``);
``fxeff train ARCH DATASET`` (``fxeff.training.train_reference``) retrains one from its fixed seed.
On the cluttered canvases a stride-2 stem keeps the cost near that of the 28x28 models.

The rewrites that need recovery fine-tuning also ship fine-tuned, for the rows of docs/accuracy.md with a target
(``FINETUNED``): ``load_finetuned(arch, dataset, technique)`` rebuilds the rewritten graph with the recorded pass
config on the recorded calibration images, loads its fine-tuned state_dict (``weights_only=True``) and checks the
result against logits recorded at save time. ``benchmarks/accuracy.py --students`` makes them.
"""
import dataclasses
import json
import os
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

ARCHS = ("vgg", "resnet20", "mobilenetv2")
DATASETS = ("fashion-mnist", "cluttered-fashion-mnist")
CHECKPOINT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What a reference model of a dataset takes: ``size`` x ``size`` grey images, ``stem_stride``."""

    size: int
    stem_stride: int
    num_classes: int = 10


DATASET_SPECS: Dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(size=28, stem_stride=1),
    "cluttered-fashion-mnist": DatasetSpec(size=64, stem_stride=2),
}


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class VGGSmall(nn.Module):
    """VGG-style: three stages of two 3x3 conv-BN-ReLU (``width``, 2x, 4x channels) with max-pools
    between, global average pooling and one linear classifier. torchvision's attribute names
    (``features``, ``classifier``), so module names read like VGG's."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_stride: int = 1, width: int = 32):
        super().__init__()
        layers = _conv_bn_relu(in_channels, width, stem_stride) + _conv_bn_relu(width, width)
        layers += [nn.MaxPool2d(2)] + _conv_bn_relu(width, 2 * width) + _conv_bn_relu(2 * width, 2 * width)
        layers += [nn.MaxPool2d(2)] + _conv_bn_relu(2 * width, 4 * width) + _conv_bn_relu(4 * width, 4 * width)
        self.input = nn.Identity()  # names the image itself as a focus split ("input")
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(self.input(x))), 1))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016, section 4.2): a 3x3 stem, three stages of three
    torchvision BasicBlocks with 16, 32, 64 channels (stride 2 at stages 2 and 3, 1x1 conv + BN
    projection shortcuts there), global average pooling, a linear classifier."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, stem_stride: int = 1, blocks: int = 3):
        from torchvision.models.resnet import BasicBlock

        super().__init__()
        self.input = nn.Identity()  # names the image itself as a focus split ("input")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            units = []
            for b in range(blocks):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or cin != cout:
                    down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=s, bias=False), nn.BatchNorm2d(cout))
                units.append(BasicBlock(cin, cout, stride=s, downsample=down))
                cin = cout
            stages.append(nn.Sequential(*units))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(self.input(x))))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def mobilenet_v2_small(num_classes: int = 10, in_channels: int = 1, stem_stride: int = 1,
                       width_mult: float = 0.5) -> nn.Module:
    """torchvision's MobileNetV2 with a width multiplier, a small-image stem (a 3x3 conv of
    ``in_channels`` with ``stem_stride``) and the ImageNet stages cut to a total stride of 8 for 28x28
    inputs (t, c, n, s as in the paper's table 2), with a 512-wide last 1x1 conv."""
    from torchvision.models import MobileNetV2

    class MobileNetV2Small(MobileNetV2):
        """torchvision's MobileNetV2 (same state_dict) whose input passes an ``input`` identity: the focus split
        that names the image itself."""

        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.input = nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.input(x))

    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 3, 2], [6, 96, 2, 1], [6, 160, 2, 2]]
    model = MobileNetV2Small(num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=setting)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=stem_stride, padding=1, bias=False)
    last = model.features[-1]
    last_width = 512
    model.features[-1] = type(last)(last[0].in_channels, last_width, kernel_size=1, norm_layer=nn.BatchNorm2d,
                                    activation_layer=nn.ReLU6)
    model.classifier[-1] = nn.Linear(last_width, num_classes)
    model.last_channel = last_width
    return model


_BUILDERS: Dict[str, Callable[..., nn.Module]] = {"vgg": VGGSmall, "resnet20": ResNet20,
                                                  "mobilenetv2": mobilenet_v2_small}


def _check(arch: str, dataset: str, caller: str) -> DatasetSpec:
    if arch not in ARCHS:
        raise ValueError(f"fxeff.reference.{caller}: arch must be one of {ARCHS}, got {arch!r}")
    if dataset not in DATASETS:
        raise ValueError(f"fxeff.reference.{caller}: dataset must be one of {DATASETS}, got {dataset!r}")
    return DATASET_SPECS[dataset]


def build(arch: str, dataset: str) -> nn.Module:
    """The untrained reference architecture ``arch`` for ``dataset`` (grey inputs, 10 classes)."""
    spec = _check(arch, dataset, "build")
    return _BUILDERS[arch](num_classes=spec.num_classes, in_channels=1, stem_stride=spec.stem_stride)


def checkpoint_path(arch: str, dataset: str) -> str:
    """Where the committed weights of ``arch`` on ``dataset`` live."""
    _check(arch, dataset, "checkpoint_path")
    return os.path.join(CHECKPOINT_DIR, f"{arch}-{dataset}.pt")


def load(arch: str, dataset: str, checkpoint: Optional[str] = None) -> nn.Module:
    """The trained reference model in eval mode: ``build(arch, dataset)`` with the weights of
    ``checkpoint`` (default: the committed ``checkpoint_path(arch, dataset)``)."""
    path = checkpoint or checkpoint_path(arch, dataset)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fxeff.reference.load: no checkpoint for {arch} on {dataset} at {path}; "
                                f"train it with `fxeff train {arch} {dataset}`")
    model = build(arch, dataset)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


# the fine-tuned rewrites that ship beside the reference checkpoints: the target rows of docs/accuracy.md
FINETUNED = ("hetconv P=4", "shift sparse")
CHECK_IMAGES = 4  # test images whose logits are recorded beside a fine-tuned checkpoint
# pass -> an init that builds the same graph without fitting on images (the weights are loaded over it anyway): a
# fine-tuned HetConv rebuilds in ~1 s instead of the ~15 s of init="fit", a shift in ~3 s instead of ~9 s (lstsq on 64
# images); the recorded logits check that the graph is the same
REBUILD_INIT = {"hetconv": "sum", "shift": "max_tap"}
FINETUNED_DIR = CHECKPOINT_DIR


def finetuned_path(arch: str, dataset: str, technique: str) -> str:
    """Where the committed fine-tuned ``technique`` (one of FINETUNED) of ``arch`` on ``dataset`` lives."""
    _check(arch, dataset, "finetuned_path")
    if technique not in FINETUNED:
        raise ValueError(f"fxeff.reference.finetuned_path: technique must be one of {FINETUNED}, got {technique!r}")
    slug = technique.replace(" ", "-").replace("=", "").lower()
    return os.path.join(FINETUNED_DIR, f"{arch}-{dataset}-{slug}.pt")


def first_images(name: str, split: str, n: int) -> torch.Tensor:
    """The first ``n`` images of the ``split`` of dataset ``name`` as one batch [n, 1, H, W]."""
    data = dataset(name, split, limit=n)
    return torch.stack([data[i][0] for i in range(min(n, len(data)))])


def _check_logits(model: nn.Module, dataset_name: str) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(first_images(dataset_name, "test", CHECK_IMAGES))


def save_finetuned(student: nn.Module, arch: str, dataset: str, technique: str, config, calibration_images: int,
                   meta: Dict[str, object]) -> str:
    """Saves a fine-tuned rewrite: its state_dict (``finetuned_path``) and, beside it as JSON, what rebuilds it
    (the pass config, the number of training images the rewrite was fitted on), logits on the first
    CHECK_IMAGES test images, and ``meta`` (accuracy, fine-tuning budget). Returns the path."""
    path = finetuned_path(arch, dataset, technique)
    state = {k: v.detach().contiguous().clone() for k, v in student.state_dict().items()}
    torch.save(state, path)
    record = {"arch": arch, "dataset": dataset, "technique": technique, "config": config.to_dict(),
              "calibration_images": calibration_images, "torch": torch.__version__,
              "check_logits": _check_logits(student, dataset).tolist(), "checkpoint_bytes": os.path.getsize(path)}
    record.update(meta)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(record, f, indent=1)
    return path


def finetuned_record(arch: str, dataset: str, technique: str) -> Dict[str, object]:
    """The JSON written beside a fine-tuned checkpoint (``save_finetuned``)."""
    path = os.path.splitext(finetuned_path(arch, dataset, technique))[0] + ".json"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"fxeff.reference.load_finetuned: no fine-tuned {technique} for {arch} on {dataset} "
                                f"at {path}; make it with `python benchmarks/accuracy.py --students`")
    with open(path) as f:
        return json.load(f)


def load_finetuned(arch: str, dataset: str, technique: str, atol: float = 1e-3) -> nn.Module:
    """The committed fine-tuned ``technique`` rewrite of the reference model, in eval mode.

    The graph is rebuilt as it was made (``fxeff.transform`` of the trained model with the recorded config on the same
    first training images; with a data-free init where that builds the same graph, REBUILD_INIT, and on the first
    CHECK_IMAGES of them), then its fine-tuned weights are loaded (``weights_only=True``). Raises
    RuntimeError when the rebuilt model's logits on the first test images differ from the recorded ones by more
    than ``atol`` (a rewrite that no longer builds the same graph)."""
    from .passes import config_from_dict
    from .transform import transform

    record = finetuned_record(arch, dataset, technique)
    config = config_from_dict(record["config"])
    images = record["calibration_images"]
    if config.pass_name in REBUILD_INIT:  # data-free: a few images give the graph its shapes
        config = dataclasses.replace(config, init=REBUILD_INIT[config.pass_name])
        images = min(images, CHECK_IMAGES)
    student = transform(load(arch, dataset), (first_images(dataset, "train", images),), [config])
    student.load_state_dict(torch.load(finetuned_path(arch, dataset, technique), map_location="cpu",
                                       weights_only=True))
    logits, recorded = _check_logits(student, dataset), torch.tensor(record["check_logits"])
    if logits.shape != recorded.shape or not torch.allclose(logits, recorded, rtol=0, atol=atol):
        raise RuntimeError(f"fxeff.reference.load_finetuned: the rebuilt {technique} model of {arch} on {dataset} "
                           f"gives logits up to {float((logits - recorded).abs().max()):.3g} away from the recorded "
                           f"ones (atol {atol}): the rewrite no longer builds the graph the checkpoint was saved from"
                           f" (recorded with torch {record['torch']}); remake it with "
                           "`python benchmarks/accuracy.py --students`")
    return student.eval()


def dataset(name: str, split: str, limit: Optional[int] = None, augment: bool = False,
            root: Optional[str] = None) -> torch.utils.data.Dataset:
    """The ``split`` of dataset ``name`` (one of DATASETS) as fxeff.data builds it; ``augment`` (training
    only) flips and shifts plain Fashion-MNIST items; cluttered items are already placed at random."""
    from . import data

    if name not in DATASETS:
        raise ValueError(f"fxeff.reference.dataset: name must be one of {DATASETS}, got {name!r}")
    if name == "fashion-mnist":
        return data.FashionMNIST(split, root=root, limit=limit, augment=augment)
    return data.ClutteredFashionMNIST(split, canvas=DATASET_SPECS[name].size, root=root, limit=limit)


__all__ = ["ARCHS", "DATASETS", "DATASET_SPECS", "CHECKPOINT_DIR", "VGGSmall", "ResNet20", "mobilenet_v2_small",
           "build", "checkpoint_path", "load", "dataset", "first_images", "FINETUNED", "finetuned_path",
           "save_finetuned", "finetuned_record", "load_finetuned"]
