"""What the ONNX target's kernels store: the weight planner's view of it (quant/plan.py)."""

from __future__ import annotations

from mobilize.quant.plan import TargetCaps

# ONNX Runtime's MatMulNBits: 4 or 8 bits, blocks, uint8 zero points, fp32 scales; float zero points exactly with a
# correction subgraph; GatherBlockQuantized for the embedding. Its int8-activation kernel runs faster on long
# blocks, so wider grids go to 8-bit blocks of 128 (one fp32 scale per 128 weights: 8.25 bits per weight instead of
# 9.25 for Q8_0's scale and zero point per 32); the correction's 4 ops cost ~20 us a tensor per token on 2 cores,
# more than the bytes they save below a few million weights (27 tensors of Gemma 3 270M: ~0.5 ms per token).
ONNX_CAPS = TargetCaps(
    "onnx", (4, 8), True, "float32", ("Q4_K", "Q5_0", "Q6_K", "Q8_0"), True, True, False, True,
    wide_block_size=128, widen_below=4_000_000,
)  # fmt: skip
