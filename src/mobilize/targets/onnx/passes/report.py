"""What a pass did, in numbers, and the contract every mobilize pass keeps (ir-py's): a fresh report per call,
returned with that call's result; `modified` computed from what that call changed; the passes it must run
after, stated (`runs_after`) and checked by the pipeline."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import onnx_ir as ir


@dataclasses.dataclass
class PassReport:
    name: str
    matched: int = 0
    rejected: Counter = dataclasses.field(default_factory=Counter)  # reason -> count
    details: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def reject(self, reason: str) -> None:
        self.rejected[reason] += 1

    def as_dict(self) -> dict[str, Any]:
        return {"pass": self.name, "matched": self.matched, "rejected": dict(self.rejected), "details": self.details}


@dataclasses.dataclass
class ReportedResult(ir.passes.PassResult):
    """A PassResult that carries the report of the call that made it (the pipeline writes it into the package)."""

    report: PassReport | None = None


class ReportingPass(ir.passes.InPlacePass):
    """Subclasses set `self._name` (the report's title), implement `run(model) -> modified` and count into
    `self.report`, which exists only during a call: a pass instance run twice (as onnx_ir's PassManager does, to
    a fixed point) reports each run alone."""

    runs_after: tuple[str, ...] = ()  # class names of passes that must come earlier in a pipeline, if present
    _name: str = "pass"

    def run(self, model: ir.Model) -> bool:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ReportedResult:
        self.report = PassReport(self._name)
        try:
            modified = self.run(model)
            return ReportedResult(model, bool(modified), self.report)
        finally:
            del self.report


def check_order(passes: list[ir.passes.PassBase]) -> None:
    """Raise ValueError if a pass comes before one it must run after."""
    seen: list[str] = []
    names = [type(p).__name__ for p in passes]
    for p, name in zip(passes, names, strict=True):
        for earlier in getattr(p, "runs_after", ()):
            if earlier in names and earlier not in seen:
                raise ValueError(f"{name} must run after {earlier} (order: {', '.join(names)})")
        seen.append(name)
