"""Graph passes over onnx-ir (cleanup, fusion, quantize, kv_cache): see issue 3."""
