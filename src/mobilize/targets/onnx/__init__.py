"""The ONNX target: the emitter that records the plain graph, the pass pipeline, the writer, genai_config."""
