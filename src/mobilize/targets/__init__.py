"""Target writers (ONNX, TFLite) and platform presets."""
