"""The decoder, written once against an emitter interface, and the numpy emitter."""
