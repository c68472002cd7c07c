"""Where the Area of Interest is taken, by default, in known model families.

The split is the module after whose output ``aoi_mask`` is computed: early enough that most convs
come after it (and are focused), late enough that activations separate object from background.
Keys are qualified class names so that two families sharing a class name (torchvision's
EfficientNet and efficientnet_lite_pytorch's) get their own split; subclasses inherit the split.
A rule is a module fqn, or a function of the model's modules (fqn -> class name, in call order)
where the fqn differs between members of a family (vgg11 / vgg16 / vgg16_bn).
"""
from typing import Callable, Mapping, Optional, Sequence, Type, Union

import torch

ModuleClasses = Mapping[str, str]  # module fqn -> class name, in the order the modules run
SplitRule = Union[str, Callable[[ModuleClasses], Optional[str]]]


def _before_first_pool(container: str) -> Callable[[ModuleClasses], Optional[str]]:
    """The module just before the first MaxPool2d among ``container``'s children: the end of the first stage."""

    def rule(modules: ModuleClasses) -> Optional[str]:
        previous = None
        for fqn, cls in modules.items():
            if not fqn.startswith(container + ".") or "." in fqn[len(container) + 1:]:
                continue
            if cls == "MaxPool2d":
                return previous
            previous = fqn
        return None

    rule.__doc__ = f"the child of {container} just before its first MaxPool2d"
    return rule


def _backbone_stem(modules: ModuleClasses) -> Optional[str]:
    """A segmentation model's backbone split as its classifier's: after a ResNet's stem (backbone.maxpool) or
    a MobileNetV3's stem and first block (backbone.1)."""
    for split in ("backbone.maxpool", "backbone.1"):
        if split in modules:
            return split
    return None


# Qualified class name -> split rule (checked on each torchvision family in tests/test_models_focus.py).
DEFAULT_SPLITS = {
    # the focusedconv seed's choice for VGG16: after conv-relu-conv-relu at full resolution (features.3;
    # vgg11: features.1, vgg16_bn: features.5)
    "torchvision.models.vgg.VGG": _before_first_pool("features"),
    # after the stem (conv, bn, relu, maxpool; 64 ch, 1/4), before layer1
    "torchvision.models.resnet.ResNet": "maxpool",
    # after the stem and the first inverted residual (16 ch, 1/2)
    "torchvision.models.mobilenetv2.MobileNetV2": "features.1",
    # after the stem and the first inverted residual (16 ch; 1/2 for large, 1/4 for small)
    "torchvision.models.mobilenetv3.MobileNetV3": "features.1",
    # torchvision's EfficientNet B*/V2: after the stem and the first stage (1/2)
    "torchvision.models.efficientnet.EfficientNet": "features.1",
    # after the stem (conv, bn, relu; 32 ch, 1/2)
    "torchvision.models.regnet.RegNet": "stem",
    # after the stem (conv, norm, relu, pool; 64 ch, 1/4), before the first dense block
    "torchvision.models.densenet.DenseNet": "features.pool0",
    # EfficientNet-Lite (PyPI efficientnet-lite-pytorch): after the stem and the first MBConv block (16 ch, 1/2)
    "efficientnet_lite_pytorch.model.EfficientNet": "_blocks.0",
    # after conv-relu at 1/4 (64 ch), before the first max pool (features.1)
    "torchvision.models.alexnet.AlexNet": _before_first_pool("features"),
    # after the patchify stem (4x4 conv s4 + LayerNorm2d; 1/4, NCHW), before the first stage
    "torchvision.models.convnext.ConvNeXt": "features.0",
    # after the stem's 7x7 conv and first max pool (64 ch, 1/4), as ResNet
    "torchvision.models.googlenet.GoogLeNet": "maxpool1",
    # after the three stem convs and the first max pool (64 ch, about 1/4)
    "torchvision.models.inception.Inception3": "maxpool1",
    # after the stem and the depthwise-separable first block (conv, dw conv, 1x1 conv + BN; 1/2), as MobileNetV2
    "torchvision.models.mnasnet.MNASNet": "layers.7",
    # after the stem conv and max pool (24 ch, 1/4)
    "torchvision.models.shufflenetv2.ShuffleNetV2": "maxpool",
    # after the first conv-relu (1_0: 96 ch, 1_1: 64 ch; 1/2), before the first max pool (features.1)
    "torchvision.models.squeezenet.SqueezeNet": _before_first_pool("features"),
    # after the two stem convs (64 ch, 1/2): the MBConv of every block is focused, attention runs on whole maps
    "torchvision.models.maxvit.MaxVit": "stem",
    # segmentation (FCN, DeepLabV3, LR-ASPP): at the backbone's split, so the heads run only in the AoI too
    "torchvision.models.segmentation.fcn.FCN": _backbone_stem,
    "torchvision.models.segmentation.deeplabv3.DeepLabV3": _backbone_stem,
    "torchvision.models.segmentation.lraspp.LRASPP": _backbone_stem,
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _rule_for(model_class: Union[Type[torch.nn.Module], str]) -> Optional[SplitRule]:
    if isinstance(model_class, str):
        return DEFAULT_SPLITS.get(model_class)
    for cls in model_class.__mro__:
        if _qualname(cls) in DEFAULT_SPLITS:
            return DEFAULT_SPLITS[_qualname(cls)]
    return None


def default_split_for_class(model_class: Union[Type[torch.nn.Module], str],
                            modules: Optional[ModuleClasses] = None) -> Optional[str]:
    """The built-in split for a model class (a type, or a qualified class name as export records it).

    ``modules`` (fqn -> class name in call order) is needed by families whose split depends on the
    member (VGG); None when the family is unknown or ``modules`` is missing for such a family.
    """
    rule = _rule_for(model_class)
    if rule is None or isinstance(rule, str):
        return rule
    return rule(modules) if modules is not None else None


def module_classes(model: torch.nn.Module) -> ModuleClasses:
    """fqn -> class name of every submodule of ``model`` (registration order, which is call order in Sequentials)."""
    return {fqn: type(m).__name__ for fqn, m in model.named_modules() if fqn}


def default_split(model: torch.nn.Module) -> Optional[str]:
    """The built-in split for ``model``'s family, or None when fxeff does not know the family."""
    return default_split_for_class(type(model), module_classes(model))


def no_split_message(where: str, model_name: str, convs: Sequence[str]) -> str:
    """Why no split can be given by default: the model has no conv after its first one (a transformer whose
    only conv is its patch embedding, such as Swin or ViT), so focusing it saves nothing; or its family has
    no built-in default."""
    if len(convs) <= 1:
        which = f"one conv ({convs[0]!r})" if convs else "no conv"
        return (f"{where}: {model_name} has {which}: an AoI taken after it leaves no conv to focus, so focusing "
                f"saves nothing on this model (a transformer whose only conv is its patch embedding computes "
                f"everything else in attention and MLP layers, which fxeff does not focus); only an AoI taken on "
                f"the input image itself, split='<the forward's input name>', would focus that one conv")
    return (f"{where}: no split given and no default split for model class {model_name!r}; pass split='<module "
            f"fqn>' (defaults exist for {sorted(set(k.rsplit('.', 1)[-1] for k in DEFAULT_SPLITS))})")
