"""The pass pipeline: one explicit list of passes per target, in phases."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx_ir as ir

from mobilize.errors import MobilizeError
from mobilize.quant.calibrate import statistics_for
from mobilize.quant.plan import head_quant, quant_for, searches_scales
from mobilize.quant.recipes import RECIPES, Recipe, WeightQuant
from mobilize.targets.onnx.caps import ONNX_CAPS
from mobilize.targets.onnx.passes.cleanup import CleanupPass
from mobilize.targets.onnx.passes.fuse_attention import FuseGroupQueryAttentionPass
from mobilize.targets.onnx.passes.fuse_attention_std import FuseStdAttentionPass
from mobilize.targets.onnx.passes.fuse_rmsnorm import FuseRMSNormPass
from mobilize.targets.onnx.passes.fuse_rotary import FuseRotaryPass
from mobilize.targets.onnx.passes.kv_cache import StaticKVCachePass
from mobilize.targets.onnx.passes.kv_dtype import KVCacheFloat16Pass
from mobilize.targets.onnx.passes.pack_matmul import PackMatMulPass
from mobilize.targets.onnx.passes.quantize import QuantizeMatMulPass
from mobilize.targets.onnx.passes.quantize_embedding import QuantizeGatherPass
from mobilize.targets.onnx.passes.report import check_order


def recipe_named(name: str) -> Recipe:
    if name not in RECIPES:
        raise MobilizeError(f"unknown quantization recipe {name!r} (known: {', '.join(RECIPES)})")
    return RECIPES[name]


OPSETS = ("ort", "std")


def onnx_passes(
    recipe: Recipe,
    max_seq_len: int,
    opset: str = "ort",
    statistics: Callable[[], Mapping[str, np.ndarray]] | None = None,
    kv_dtype: str = "float32",
) -> list[ir.passes.PassBase]:
    """ONNX Runtime (`ort`): contrib fused ops and an in-place static cache. Standard ONNX (`std`):
        opset-23 RMSNormalization, RotaryEmbedding and Attention, with a growing cache. `statistics`: gives the
        calibration (quant/calibrate.py) when the first weight that uses it is written, so it may still be
        running while the graph is built and the other weights are written. `kv_dtype` "float16": the static cache
    (and the attention that reads it) in float16."""
    if opset not in OPSETS:
        raise MobilizeError(f"unknown --opset {opset!r} (known: {', '.join(OPSETS)})")
    std = opset == "std"
    # phase: fusion
    passes: list[ir.passes.PassBase] = [FuseRMSNormPass(std=std), FuseRotaryPass(max_seq_len, std=std)]
    if std and kv_dtype != "float32":
        raise MobilizeError(f"--kv-dtype {kv_dtype} needs --opset ort (the standard opset's cache grows in float32)")
    if std:
        passes.append(FuseStdAttentionPass())
    else:
        passes += [FuseGroupQueryAttentionPass(), StaticKVCachePass(max_seq_len)]
        if kv_dtype == "float16":
            passes.append(KVCacheFloat16Pass())
    # phase: quantize
    importance = None
    if statistics is not None:
        importance = lambda name: statistics_for(statistics(), name)  # noqa: E731
    searched = importance if searches_scales(recipe, ONNX_CAPS) else None  # a split head ranks by its own
    matmul = _matmul_pass(recipe, recipe.matmul, importance=searched) if recipe.matmul is not None else None
    # (packing asks the quantize pass how it will store each part: parts re-rounded alike pack whatever their grids)
    passes.append(PackMatMulPass(carry_blocks=recipe.carry_source_blocks, plan=matmul.plan if matmul else None))
    head = head_quant(recipe, ONNX_CAPS, statistics is not None)
    if head is not None:
        passes.append(_matmul_pass(recipe, head, weights=_is_head, label="[head]", importance=importance))
    if matmul is not None:
        passes.append(matmul)
    if (e := quant_for(recipe, "embedding", ONNX_CAPS)) is not None:  # after the head: a tied table is no longer
        # shared when replaced
        passes.append(QuantizeGatherPass(e, carry_source_blocks=recipe.carry_source_blocks,
                                         share_tied=recipe.share_tied_table))  # fmt: skip
    # phase: cleanup
    passes.append(CleanupPass())
    return passes


def _matmul_pass(recipe: Recipe, q: WeightQuant, **kwargs) -> QuantizeMatMulPass:
    return QuantizeMatMulPass(
        q, carry_source_blocks=recipe.carry_source_blocks, accuracy_level=recipe.accuracy_level, **kwargs
    )


HEAD_WEIGHTS = ("lm_head.weight", "model.embed_tokens.weight")


def _is_head(name: str) -> bool:
    # A MatMul on the embedding can only be the tied head (the embedding itself is a Gather).
    return name in HEAD_WEIGHTS


def run_passes(model: ir.Model, passes: list[ir.passes.PassBase]) -> list[dict]:
    """Run the passes in order; return their reports. An error names the pass and what ran before it.
    Quantization statistics arrive when the model is written (the quantized tensors are lazy): call
    `summarize` on the reports after saving."""
    try:
        check_order(passes)
    except ValueError as e:
        raise MobilizeError(f"pass pipeline out of order: {e}") from None
    reports, ran = [], []
    for p in passes:
        try:
            result = p(model)
        except Exception as e:
            before = ", ".join(ran) or "nothing"
            raise MobilizeError(f"pass {type(p).__name__} failed (after {before}): {e}") from e
        ran.append(type(p).__name__)
        report = getattr(result, "report", None)  # this call's own report
        if report is not None:
            reports.append(report.as_dict())
    return reports


def summarize(reports: list[dict]) -> list[dict]:
    return [_summary(dict(r)) for r in reports]


def _summary(report: dict) -> dict:
    details = report.pop("details")
    errors = [d["rel_rms_error"] for d in details if "rel_rms_error" in d]
    if errors:
        report["rel_rms_error"] = {"mean": sum(errors) / len(errors), "max": max(errors)}
        report["tensors"] = details
    elif details:
        report["details"] = details
    return report
