"""Quantization: pure primitives with their inverses, named recipes, calibration statistics."""
