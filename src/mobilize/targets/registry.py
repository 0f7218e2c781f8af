"""The targets: one line each. A target is its folder plus this line (targets/base.py says what it provides)."""

from __future__ import annotations

from mobilize.targets.base import Target
from mobilize.targets.onnx.target import OnnxTarget
from mobilize.targets.tflite.target import TfliteTarget

TARGETS: dict[str, Target] = {
    "onnx": OnnxTarget(),
    "tflite": TfliteTarget(),
}
