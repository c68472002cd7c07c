"""Pass configs: plain dataclasses that travel as dicts (torch.compile options, JSON, other processes).

Each pass has one config class, registered under its pass name; ``config_from_dict`` turns
``{"pass": "focus", ...}`` back into the config. A process that never imported fxeff can therefore
hand ``options={"passes": [{"pass": "focus", "threshold": 0.5}]}`` to the "effconv" backend.
"""
import dataclasses
from typing import Any, Dict, Mapping, Sequence, Type, TypeVar, Union

CONFIG_VERSION = 1

_REGISTRY: Dict[str, Type["PassConfig"]] = {}

C = TypeVar("C", bound="PassConfig")


def register_pass_config(name: str):
    """Class decorator: registers a PassConfig subclass under ``name`` (its ``pass`` key in dicts)."""

    def decorate(cls: Type[C]) -> Type[C]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"fxeff.passes: pass name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.pass_name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def registered_passes() -> Dict[str, Type["PassConfig"]]:
    """Pass name -> config class, for every registered pass."""
    return dict(_REGISTRY)


class PassConfig:
    """Base of pass configs (dataclasses). ``pass_name`` is set by ``register_pass_config``."""

    pass_name: str = ""

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-safe dict with the pass name and version; ``config_from_dict`` inverts it."""
        d = {"pass": self.pass_name, "version": CONFIG_VERSION}
        d.update(dataclasses.asdict(self))
        return d

    @classmethod
    def from_dict(cls: Type[C], d: Mapping[str, Any]) -> C:
        """The config of this class from ``d`` (the ``pass`` key, when present, must name this class's pass)."""
        d = dict(d)
        name = d.pop("pass", cls.pass_name)
        if name != cls.pass_name:
            raise ValueError(f"fxeff.passes.{cls.__name__}.from_dict: 'pass' must be {cls.pass_name!r}, got {name!r}")
        version = d.pop("version", CONFIG_VERSION)
        if version != CONFIG_VERSION:
            raise ValueError(f"fxeff.passes.{cls.__name__}.from_dict: 'version' must be {CONFIG_VERSION}, "
                             f"got {version!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"fxeff.passes.{cls.__name__}.from_dict: unknown keys {unknown}; "
                             f"expected a subset of {sorted(fields)}")
        return cls(**d)


def config_from_dict(d: Union[Mapping[str, Any], PassConfig]) -> PassConfig:
    """The pass config described by ``d`` (``{"pass": name, **fields}``); a config passes through unchanged."""
    if isinstance(d, PassConfig):
        return d
    if not isinstance(d, Mapping):
        raise TypeError(f"fxeff.passes.config_from_dict: expected a dict or a pass config, got {type(d).__name__}")
    if "pass" not in d:
        raise ValueError(f"fxeff.passes.config_from_dict: the dict needs a 'pass' key naming one of "
                         f"{sorted(_REGISTRY)}, got keys {sorted(d)}")
    name = d["pass"]
    if name not in _REGISTRY:
        raise ValueError(f"fxeff.passes.config_from_dict: unknown pass {name!r}; known passes: {sorted(_REGISTRY)}")
    return _REGISTRY[name].from_dict(d)


@dataclasses.dataclass
class PassContext:
    """What a pass may know besides the graph: the example inputs (real or fake tensors, in the order of
    the graph's placeholders) and the model's class (for per-family defaults; a type or a class name)."""

    example_inputs: Sequence[Any]
    model_class: Union[type, str, None] = None
