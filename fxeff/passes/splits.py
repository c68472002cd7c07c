"""Where the Area of Interest is taken, by default, in known model families.

The split is the module after whose output ``aoi_mask`` is computed: early enough that most convs
come after it (and are focused), late enough that activations separate object from background.
"""
from typing import Optional

import torch

# Class name -> fully qualified name of the split module.
DEFAULT_SPLITS = {
    "VGG": "features.3",  # the focusedconv seed's choice: after conv-relu-conv-relu at full resolution
    "ResNet": "maxpool",  # after the stem (conv, bn, relu, maxpool), before layer1
    "MobileNetV2": "features.1",  # after the stem and the first inverted residual
    "MobileNetV3": "features.1",
    "EfficientNet": "features.1",  # torchvision's EfficientNet B*/V2
    "RegNet": "stem",
    "DenseNet": "features.pool0",
}


def default_split(model: torch.nn.Module) -> Optional[str]:
    """The built-in split for ``model``'s family, or None when fxeff does not know the family."""
    for cls in type(model).__mro__:
        if cls.__name__ in DEFAULT_SPLITS:
            return DEFAULT_SPLITS[cls.__name__]
    return None
