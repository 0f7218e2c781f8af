"""mobilize: open LLM checkpoints compiled into ONNX and LiteRT packages for phones, and measured.

The folders are the phases, lowest first (a phase imports only the ones before it; tests/test_layering.py):
frontend (checkpoints -> config + lazy weights), model (the one decoder), quant (primitives, recipes,
calibration), targets (onnx, tflite), package (verify, fit, README), harness (runners, perf, accuracy,
devices), driver (export), bench, cli.
"""

__version__ = "0.1.0"
