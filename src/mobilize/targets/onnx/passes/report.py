"""What a pass did, in numbers: the pipeline writes these into the package's build report."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any


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
