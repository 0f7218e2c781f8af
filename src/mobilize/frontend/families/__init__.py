"""Architecture configs (one frozen dataclass) and the per-family quirks that fill it."""
