"""torch.fx passes of fxeff, written once against the normalised graph view (graph.py).

A pass is a config dataclass (serialisable: ``config_from_dict``) whose ``run`` rewrites a
GraphModule in place and returns a Report; ``run_passes`` applies a list of them.
"""
from .blocks import Blocks
from .config import PassConfig, PassContext, config_from_dict, register_pass_config, registered_passes
from .focus import Focus
from .fold_batch_norm import FoldBatchNorm
from .fuse_shift import FuseShift
from .glance import Glance
from .hetconv import HetConv
from .graph import ConvSite, conv_sites, graph_kind, normalize_fqn
from .runner import run_passes
from .shift import Shift
from .splits import DEFAULT_SPLITS, default_split, default_split_for_class

__all__ = ["PassConfig", "PassContext", "config_from_dict", "register_pass_config", "registered_passes", "Focus",
           "Shift", "FuseShift", "FoldBatchNorm",
           "HetConv", "Blocks", "Glance", "ConvSite", "conv_sites", "graph_kind", "normalize_fqn",
           "run_passes", "DEFAULT_SPLITS", "default_split", "default_split_for_class"]
