"""The one small exception hierarchy. The CLI turns any of these into one line and exit code 1."""


class MobilizeError(Exception):
    """Anything a user can cause: say the value, the constraint and the fix."""


class CheckpointError(MobilizeError):
    """A checkpoint file is malformed, truncated, or disagrees with its config."""


class ConfigError(MobilizeError):
    """A config is missing a field or holds a value we cannot build."""


class UnsupportedArchitectureError(MobilizeError):
    """The checkpoint's architecture is not one mobilize builds."""


class SourceNotFoundError(MobilizeError):
    """An alias or path names nothing we can find offline."""
