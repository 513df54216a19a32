"""Training-only modules: the submodules whose weights no exported encoder reads, found in the encoders' own
`torch.export` graphs rather than listed by hand, so that a new training objective's heads never reach an export.
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind


def read_tensors(program: ExportedProgram) -> set[str]:
    """Fully qualified names of the parameters and buffers that `program`'s graph reads."""
    used = {node.name for node in program.graph.nodes if node.op == "placeholder" and node.users}
    return {spec.target for spec in program.graph_signature.input_specs
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and spec.arg.name in used}


def unreachable_modules(model: nn.Module, programs: Iterable[ExportedProgram]) -> list[str]:
    """The largest submodules of `model` that own tensors none of which `programs` read. The programs must be
    exported from wrappers that name the towers as `model` does (`visual`, `text`)."""
    used: set[str] = set().union(*(read_tensors(p) for p in programs))
    unreachable: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(f"{outer}.") for outer in unreachable):
            continue
        owned = [f"{name}.{t}" for t, _ in [*module.named_parameters(), *module.named_buffers()]]
        if owned and not used.intersection(owned):
            unreachable.append(name)
    return unreachable


def drop_modules(model: nn.Module, names: Iterable[str]) -> None:
    """Delete the named submodules (dotted paths) from `model` in place."""
    for name in names:
        parent, _, child = name.rpartition(".")
        delattr(model.get_submodule(parent), child)
