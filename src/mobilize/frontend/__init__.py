"""Checkpoints in: sources (HF directory, GGUF, alias, random weights), the loader, the family records."""
