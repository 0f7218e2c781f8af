"""What the TFLite target's kernels store: the weight planner's view of it (quant/plan.py)."""

from __future__ import annotations

from mobilize.quant.plan import TargetCaps

# LiteRT (XNNPACK): INT4 blockwise with fp16 scales and no zero points, INT4/INT8 per output channel; Q4_K's float
# zero points exactly with a correction (SUM + FULLY_CONNECTED + ADD); a head parted by input channel (GATHER, two
# SLICEs, two FULLY_CONNECTED and an ADD), its lookup reading both parts (int8 rows and INT4 blocks). Its int8/int4
# FULLY_CONNECTED quantizes the float input per row (XNNPACK's dynamically quantized kernels): inputs are smoothed.
TFLITE_CAPS = TargetCaps(
    "tflite", (4,), False, "float16", ("Q4_K",), False, True, True, False, channel_bits=(4, 8),
    row_quantized_activations=True,
)  # fmt: skip
