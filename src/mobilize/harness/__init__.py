"""Runners behind one protocol (reference, onnxruntime), generate loop, accuracy and perf."""
