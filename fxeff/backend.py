"""The "effconv" torch.compile backend: fxeff's passes on dynamo's graph, then inductor.

Usage: ``torch.compile(model, backend="effconv", options={"passes": [{"pass": "focus", "threshold": t}]})``, or
``torch.compile(model, backend="effconv")`` on a model whose graph holds an AoI threshold (Focus with the
graph's own split and threshold; a model without such a pattern is compiled by inductor unchanged and
``last_report()`` says why).

The name is registered once, through the entry point group ``torch_dynamo_backends`` declared in
pyproject.toml (``effconv = "fxeff.backend:effconv"``); this module never calls register_backend,
so ``import fxeff`` followed by ``torch.compile(..., backend="effconv")`` cannot clash with the
entry point, and a process that never imported fxeff can use the name: torch imports this module
on first use, which imports fxeff and so loads the operator library.
"""
import dataclasses
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx

from .passes import Focus, PassConfig, config_from_dict, run_passes
from .passes.focus import existing_aoi_thresholds
from .passes.measure import fake_mode_of
from .report import Report

log = logging.getLogger(__name__)

OPTION_KEYS = ("passes", "inductor", "inductor_config", "model_class")

_last_report: Optional[Report] = None


def last_report() -> Optional[Report]:
    """The Report of the most recent graph that "effconv" compiled in this process (None before any).

    One torch.compile'd model may yield several graphs (graph breaks, recompiles for new shapes);
    each replaces the previous report. The report is also logged at INFO on logger ``fxeff.backend``.
    """
    return _last_report


def parse_options(options: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Validated options of the backend, with defaults filled in.

    ``passes``: pass configs or their dicts (``{"pass": "focus", "threshold": t}``); when absent (or no
    options at all), the backend runs the passes whose pattern the graph already expresses (see
    ``passes_from_graph``), and plain inductor with a report saying why when there is none.
    ``inductor`` (default True): hand the rewritten graph to inductor; False runs it eagerly.
    ``inductor_config``: inductor config patches (dict) for compile_fx, e.g. ``{"freezing": True}``.
    ``model_class``: the model's class or qualified class name, for per-family pass defaults (Focus's
    split) when the backend cannot find the compiled module itself.
    """
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"fxeff.backend.effconv: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise ValueError(f"fxeff.backend.effconv: unknown options {unknown}; expected a subset of {list(OPTION_KEYS)}")
    passes = options.get("passes")
    if passes is None:
        pass  # found in the graph (passes_from_graph)
    elif isinstance(passes, (PassConfig, Mapping)):
        raise TypeError("fxeff.backend.effconv: options['passes'] must be a list of pass configs or dicts, got a single "
                        f"{type(passes).__name__}; wrap it in a list")
    elif not isinstance(passes, (list, tuple)) or not passes:
        raise ValueError("fxeff.backend.effconv: options['passes'] must be a non-empty list of pass configs or dicts "
                         f"such as {{'pass': 'focus', 'threshold': 0.5}}, got {passes!r}")
    inductor = options.get("inductor", True)
    if not isinstance(inductor, bool):
        raise TypeError(f"fxeff.backend.effconv: options['inductor'] must be a bool, got {type(inductor).__name__}")
    inductor_config = options.get("inductor_config", {})
    if not isinstance(inductor_config, Mapping):
        raise TypeError(f"fxeff.backend.effconv: options['inductor_config'] must be a dict, "
                        f"got {type(inductor_config).__name__}")
    if inductor_config and not inductor:
        raise ValueError("fxeff.backend.effconv: options['inductor_config'] was given with options['inductor']=False")
    model_class = options.get("model_class")
    if model_class is not None and not isinstance(model_class, (str, type)):
        raise TypeError(f"fxeff.backend.effconv: options['model_class'] must be a class or a qualified class name, "
                        f"got {type(model_class).__name__}")
    return {"passes": None if passes is None else [config_from_dict(p) for p in passes], "inductor": inductor,
            "inductor_config": dict(inductor_config), "model_class": model_class}


def _compiled_root_module(gm: fx.GraphModule) -> Optional[torch.nn.Module]:
    """The nn.Module whose parameters dynamo lifted into ``gm``'s inputs, when there is exactly one.

    Dynamo records, for each graph input, the source it was read from (``L['self']._modules['conv1']
    ._parameters['weight']``); the innermost nn.Module source of those chains is the compiled model.
    Uses dynamo internals (the current frame and GraphArg sources); None whenever they are missing,
    so that the caller's pass asks for what it needs (e.g. Focus(split=...)) instead of guessing.
    """
    try:
        from torch._dynamo.source import NNModuleSource
        from torch._dynamo.symbolic_convert import InstructionTranslator
        tx = InstructionTranslator.current_tx()
    except (ImportError, AttributeError):
        return None
    if tx is None:
        return None
    roots = {}
    for node in gm.graph.nodes:
        if node.op != "placeholder" or node.meta.get("grapharg") is None:
            continue
        source, innermost = getattr(node.meta["grapharg"], "source", None), None
        while source is not None:
            if isinstance(source, NNModuleSource):
                innermost = source
            source = getattr(source, "base", None)
        if innermost is None:
            continue
        try:
            # dynamo's source names read the frame's locals as L[...] and its globals as G[...]
            module = innermost.base.get_value({"L": dict(tx.f_locals), "G": tx.f_globals}, {}, {})
        except Exception:  # a source dynamo can evaluate but we cannot (closures, ...): no root from this input
            continue
        if isinstance(module, torch.nn.Module):
            roots[id(module)] = module
    return next(iter(roots.values())) if len(roots) == 1 else None


_PATTERNS = ("an AoI threshold (an fxeff.nn.AoIThreshold module, an fxeff.ops.aoi_mask call, or x.sum(1) >= t "
             "on a 4-D activation): the Focus pass")


def _static_real(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> str:
    """Why Focus's default execution ("auto", which times each grid's options on the example inputs' AoI at the
    graph's shapes) cannot run on this graph, or "" when it can: fake example inputs, or dynamic shapes (dynamo
    recompiles with symbolic sizes after a new input size)."""
    if fake_mode_of(list(example_inputs)) is not None:
        return "the example inputs are fake tensors (nothing to time)"
    for node in gm.graph.find_nodes(op="placeholder"):
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt) or (isinstance(value, torch.Tensor) and not all(
                isinstance(s, int) for s in value.shape)):
            return "the graph has dynamic shapes (planned grids need static ones)"
    return ""


def passes_from_graph(gm: fx.GraphModule, example_inputs: Sequence[Any] = ()) -> Tuple[List[PassConfig], str]:
    """(the passes whose pattern ``gm`` already expresses, why not when none): the compile form without options.

    Focus where the graph holds one AoI threshold with a constant threshold (its split and its threshold
    and reduce are the graph's own), in Focus's default execution ("auto") where the example inputs are real
    and the shapes static, else in execution "layer" (the report's notes say why). Several thresholds on
    different activations, or a threshold computed in the graph, are left alone and said why: choosing among
    them is the user's call (options['passes']).
    """
    thresholds = existing_aoi_thresholds(gm)
    if not thresholds:
        return [], (f"no options were given and the graph holds no pattern that fxeff rewrites without options "
                    f"({_PATTERNS}): nothing was rewritten, the graph was compiled as it is; give "
                    f"options={{'passes': [...]}} to choose passes")
    distinct = {(found.node, found.threshold, found.reduce) for found in thresholds}
    if len(distinct) > 1:
        return [], (f"no options were given and the graph holds {len(distinct)} different AoI thresholds "
                    f"({[found.description for found in thresholds]}): nothing was rewritten; choose one with "
                    f"options={{'passes': [{{'pass': 'focus', 'threshold': t, 'split': ...}}]}}")
    found = thresholds[0]
    if found.threshold is None:
        return [], (f"no options were given and the AoI threshold in the graph ({found.description}) is not a "
                    f"constant: nothing was rewritten; give options={{'passes': [{{'pass': 'focus', "
                    f"'threshold': t}}]}}")
    blocker = _static_real(gm, example_inputs)
    if blocker:
        return [Focus(threshold=found.threshold, reduce=found.reduce, execution="layer")], (
            f"Focus runs in execution 'layer' here, not the default 'auto': {blocker}")
    return [Focus(threshold=found.threshold, reduce=found.reduce)], ""


def effconv(gm: fx.GraphModule, example_inputs: List[Any], options: Optional[Mapping[str, Any]] = None,
            mode: Optional[str] = None) -> Callable[..., Any]:
    """The "effconv" backend: runs ``options['passes']`` on dynamo's graph (the same run_passes as
    fxeff.transform), then compiles the rewritten graph with inductor (compile_fx, which also builds
    the backward through the ops' registered autograd and fake kernels, so training works).

    With ``options['inductor'] = False`` it returns the rewritten graph's forward, run eagerly (for
    debugging a pass without inductor). The Report is logged and kept: ``fxeff.backend.last_report()``.
    Without ``options['passes']`` it runs the passes whose pattern the graph expresses (passes_from_graph);
    where there is none it compiles the graph unchanged and the report says why. A pass that was given
    and cannot apply (e.g. no split found) raises: no eager fallback.
    """
    global _last_report
    if mode is not None:
        raise ValueError(f"fxeff.backend.effconv: mode={mode!r} is not supported; give "
                         "options={'passes': [...], 'inductor_config': {...}} instead")
    parsed = parse_options(options)
    model_class = parsed["model_class"]
    if model_class is None:
        root = _compiled_root_module(gm)
        model_class = type(root) if root is not None else None
    passes, why = (parsed["passes"], "") if parsed["passes"] is not None else passes_from_graph(gm, example_inputs)
    if passes:
        report = run_passes(gm, example_inputs, passes, model_class=model_class)
        if why:
            report.notes.insert(0, why)
    else:
        report = Report(pass_name="effconv", notes=[why])
    _last_report = report
    log.info("fxeff effconv: rewrote the dynamo graph (%d nodes):\n%s", len(gm.graph.nodes), report)
    if not parsed["inductor"]:
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    context = torch._guards.TracingContext.try_get()
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    if shape_env is not None:
        # region execution's tile plans have a data-dependent size (nonzero): inductor traces it as an unbacked
        # size, which dynamo's shape env allows only with fullgraph=True or capture_dynamic_output_shape_ops
        # (else compile_fx fails and dynamo runs the graph eagerly after a graph break)
        shape_env.settings = dataclasses.replace(shape_env.settings, allow_dynamic_output_shape_ops=True)
    return compile_fx(gm, example_inputs, config_patches=parsed["inductor_config"] or None)
