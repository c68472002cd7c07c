"""Deployment of focused models: TorchScript trace, torch.export, and AOTInductor packages.

Every artifact keeps fxeff's ops as op calls (``fxeff::aoi_mask``, ``fxeff::mask_resize``,
``fxeff::focused_conv2d``): the AoI is computed in the graph from each new input, never frozen at
trace or export time. Loading an artifact therefore needs the op library: ``import fxeff`` in
Python, ``dlopen(fxeff.library_path())`` in C++ (examples/cpp). The image size is fixed by the
example inputs (each conv's mask grid is a constant of the graph); the batch size is free for a
trace, and for export/AOTInductor when ``dynamic_shapes`` marks it (see ``batch_dynamic_shapes``).

The modern path is ``export`` -> ``aoti_package``; ``trace`` serves libtorch programs that load
TorchScript (torch.jit is deprecated in torch 2.14 but works).
"""
import collections
import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

from . import load_library

FXEFF_NAMESPACE = "fxeff"

Inputs = Union[torch.Tensor, Sequence[Any]]


def _as_tuple(example_inputs: Inputs, where: str) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"fxeff.export.{where}: example_inputs must be a tensor or a tuple/list of the forward's inputs, "
                    f"got {type(example_inputs).__name__}")


def _op_name(target: Any) -> Optional[str]:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
        name = target.name() if isinstance(target, torch._ops.OpOverload) else target._qualified_op_name
        return name.split(".")[0]
    return None


def fxeff_ops_in(artifact: Any) -> Dict[str, int]:
    """How many calls of each fxeff op the artifact's graph holds ({"fxeff::focused_conv2d": 5, ...}).

    ``artifact``: a torch.fx.GraphModule, a torch.export.ExportedProgram or a TorchScript module.
    """
    counts: Dict[str, int] = collections.Counter()
    if isinstance(artifact, torch.export.ExportedProgram):
        artifact = artifact.graph_module
    if isinstance(artifact, torch.fx.GraphModule):
        for module in artifact.modules():
            if isinstance(module, torch.fx.GraphModule):
                for node in module.graph.nodes:
                    name = _op_name(node.target) if node.op == "call_function" else None
                    if name is not None and name.startswith(FXEFF_NAMESPACE + "::"):
                        counts[name] += 1
        return dict(counts)
    if isinstance(artifact, torch.jit.ScriptModule):
        graphs = [artifact.inlined_graph]
        for graph in graphs:
            for node in graph.nodes():
                if node.kind().startswith(FXEFF_NAMESPACE + "::"):
                    counts[node.kind()] += 1
        return dict(counts)
    raise TypeError(f"fxeff.export.fxeff_ops_in: expected a GraphModule, ExportedProgram or ScriptModule, "
                    f"got {type(artifact).__name__}")


def _check_has_fxeff_ops(artifact: Any, where: str) -> None:
    if not fxeff_ops_in(artifact):
        raise ValueError(f"fxeff.export.{where}: the result calls no fxeff op; pass the model rewritten by "
                         f"fxeff.transform(model, example_inputs, passes=[...]) (or require_fxeff_ops=False to "
                         f"deploy an unmodified model)")


def trace(model: torch.nn.Module, example_inputs: Inputs, path: Optional[str] = None,
          require_fxeff_ops: bool = True) -> torch.jit.ScriptModule:
    """torch.jit.trace of a focused model (e.g. fxeff.transform's GraphModule), saved to ``path`` when given.

    jit.trace records the fxeff op calls themselves, so the AoI follows each input; control flow is
    frozen as in any trace (fxeff's rewrite adds none). Load with ``load_traced`` or torch::jit::load.
    """
    inputs = _as_tuple(example_inputs, "trace")
    with torch.no_grad():
        traced = torch.jit.trace(model, inputs)
    if require_fxeff_ops:
        _check_has_fxeff_ops(traced, "trace")
    if path is not None:
        torch.jit.save(traced, os.fspath(path))
    return traced


def load_traced(path: str, map_location: Optional[str] = None) -> torch.jit.ScriptModule:
    """A model saved by ``trace``, with fxeff's op library loaded first (torch.jit.load needs the ops)."""
    load_library()
    return torch.jit.load(os.fspath(path), map_location=map_location)


def batch_dynamic_shapes(example_inputs: Inputs, max_batch: int = 1024) -> tuple:
    """A ``dynamic_shapes`` spec for ``export`` that frees dim 0 (the batch) of every tensor input."""
    inputs = _as_tuple(example_inputs, "batch_dynamic_shapes")
    batch = torch.export.Dim("batch", min=1, max=max_batch)
    return tuple({0: batch} if isinstance(x, torch.Tensor) else None for x in inputs)


def export(model: torch.nn.Module, example_inputs: Inputs, path: Optional[str] = None,
           dynamic_shapes: Any = None, require_fxeff_ops: bool = True) -> torch.export.ExportedProgram:
    """torch.export.export of a focused model (fxeff's ops export through their fake kernels), saved
    to ``path`` (a .pt2 file) when given. Load with ``load_exported``."""
    inputs = _as_tuple(example_inputs, "export")
    program = torch.export.export(model, inputs, dynamic_shapes=dynamic_shapes)
    if require_fxeff_ops:
        _check_has_fxeff_ops(program, "export")
    if path is not None:
        torch.export.save(program, os.fspath(path))
    return program


def load_exported(path: str) -> torch.export.ExportedProgram:
    """An ExportedProgram saved by ``export``, with fxeff's op library loaded first."""
    load_library()
    return torch.export.load(os.fspath(path))


def aoti_package(model: Union[torch.nn.Module, torch.export.ExportedProgram], example_inputs: Inputs, path: str,
                 dynamic_shapes: Any = None, inductor_configs: Optional[Dict[str, Any]] = None) -> str:
    """Compiles a focused model (or an ExportedProgram of one) ahead of time with AOTInductor into the
    package ``path`` (.pt2); returns the path. fxeff's ops run in the package through inductor's
    proxy executor, which calls them through the dispatcher, so the process that runs the package
    must have the op library loaded (``load_aoti`` does it)."""
    if not os.fspath(path).endswith(".pt2"):
        raise ValueError(f"fxeff.export.aoti_package: path must end with .pt2, got {path!r}")
    if isinstance(model, torch.export.ExportedProgram):
        if dynamic_shapes is not None:
            raise ValueError("fxeff.export.aoti_package: dynamic_shapes applies when exporting; the given "
                             "ExportedProgram already fixes its shapes")
        program = model
        _check_has_fxeff_ops(program, "aoti_package")
    else:
        program = export(model, example_inputs, dynamic_shapes=dynamic_shapes)
    return torch._inductor.aoti_compile_and_package(program, package_path=os.fspath(path),
                                                    inductor_configs=inductor_configs)


def load_aoti(path: str) -> Callable[..., Any]:
    """A runner for an AOTInductor package written by ``aoti_package`` (call it like the model)."""
    load_library()
    return torch._inductor.aoti_load_package(os.fspath(path))
