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


def runtime_reason(e: BaseException, limit: int = 300) -> str:
    """A runtime's exception as part of one line: its first non-empty line, cut short."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."
