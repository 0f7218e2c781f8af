"""Quantization recipes: named presets, plain data. A recipe says how each kind of weight is stored."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class WeightQuant:
    bits: int
    block_size: int
    symmetric: bool


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    matmul: WeightQuant | None  # every linear layer (and the head, unless `head` says otherwise)
    head: WeightQuant | None = None  # the output projection (lm_head, or the tied embedding)
    embedding: WeightQuant | None = None  # the input embedding lookup


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        Recipe("fp32", "no quantization", None),
        Recipe(
            "int8",
            "8-bit weights and embedding, blocks of 32, symmetric",
            WeightQuant(8, 32, True),
            embedding=WeightQuant(8, 32, True),
        ),
        Recipe(
            "int4",
            "4-bit weights and embedding, blocks of 32, asymmetric; the output head 8-bit (it carries the most "
            "error per bit)",
            WeightQuant(4, 32, False),
            head=WeightQuant(8, 32, True),
            embedding=WeightQuant(4, 32, False),
        ),
        Recipe(
            "int4-all", "4-bit weights everywhere, head included, blocks of 32, asymmetric", WeightQuant(4, 32, False)
        ),
        Recipe("int4-b32-sym", "4-bit weights, blocks of 32, symmetric", WeightQuant(4, 32, True)),
        Recipe("int4-b128-asym", "4-bit weights, blocks of 128, asymmetric", WeightQuant(4, 128, False)),
    ]
}
