"""Checkpoint sources: Hugging Face directories, GGUF files, aliases, random weights."""
