"""What every checkpoint source hands the loader: a config dict and lazily readable tensors."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorRef:
    """One tensor of a checkpoint, read only when `load()` is called.

    `shape` is in the source's row-major (numpy) order. `dtype` is the storage type as the file
    names it (F32, BF16, Q4_K, ...); `load()` always returns float32 (or the integer type stored).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    load: Callable[[], np.ndarray]
    # GGUF block formats: the stored bytes as uint8 [rows, bytes_per_row], for carrying blocks over exactly.
    raw: Callable[[], np.ndarray] | None = None
    # What changed the values since the source (a LoRA merged, ...): off the source's grid, said in the plan's note
    altered: str = ""

    def rows(self, part: slice, name: str | None = None) -> TensorRef:
        """Rows `part` of a matrix, still lazy (a block format's raw bytes too: its rows are whole blocks)."""
        count = len(range(*part.indices(self.shape[0])))

        def cut(load):
            return lambda: np.ascontiguousarray(load()[part])

        return dataclasses.replace(
            self, name=name or f"{self.name}[{part.start}:{part.stop}]", shape=(count, *self.shape[1:]),
            nbytes=self.nbytes * count // self.shape[0], load=cut(self.load),
            raw=cut(self.raw) if self.raw is not None else None,
        )  # fmt: skip


@dataclasses.dataclass
class Checkpoint:
    """A source opened for reading. `family` and `hf_config` decide the architecture config;
    `gguf_metadata` is set for GGUF sources (the architecture reads its keys from there)."""

    source: str
    format: str  # "hf", "gguf" or "random"
    family: str
    tensors: dict[str, TensorRef]
    hf_config: dict[str, Any] | None = None
    gguf_metadata: dict[str, Any] | None = None
    files: list[str] = dataclasses.field(default_factory=list)

    @property
    def bytes_on_disk(self) -> int:
        import os

        return sum(os.path.getsize(f) for f in self.files)
