"""The TFLite (LiteRT) target: the emitter per signature, weights, the flatbuffer writer, the LiteRT-LM bundle."""
