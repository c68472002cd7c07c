"""Where the Area of Interest is taken, by default, in known model families.

The split is the module after whose output ``aoi_mask`` is computed: early enough that most convs
come after it (and are focused), late enough that activations separate object from background.
Keys are qualified class names so that two families sharing a class name (torchvision's
EfficientNet and efficientnet_lite_pytorch's) get their own split; subclasses inherit the split.
"""
from typing import Optional, Type, Union

import torch

# Qualified class name -> fully qualified name of the split module (checked on each torchvision model in tests).
DEFAULT_SPLITS = {
    # the focusedconv seed's choice: after conv-relu-conv-relu at full resolution (64 ch, 1/1)
    "torchvision.models.vgg.VGG": "features.3",
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
}


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def default_split_for_class(model_class: Union[Type[torch.nn.Module], str]) -> Optional[str]:
    """The built-in split for a model class (a type, or a qualified class name as export records it), else None."""
    if isinstance(model_class, str):
        return DEFAULT_SPLITS.get(model_class)
    for cls in model_class.__mro__:
        if _qualname(cls) in DEFAULT_SPLITS:
            return DEFAULT_SPLITS[_qualname(cls)]
    return None


def default_split(model: torch.nn.Module) -> Optional[str]:
    """The built-in split for ``model``'s family, or None when fxeff does not know the family."""
    return default_split_for_class(type(model))
