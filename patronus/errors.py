"""Named errors of patronus. Every invalid input raises one of these."""

from __future__ import annotations

__all__ = ["PatronusError", "ConfigError", "StateError", "SchemaVersionError", "DataplaneUnavailable", "MalformedProbe",
           "ProbeUnavailable"]


class PatronusError(Exception):
    """Base class of every error patronus raises on purpose."""


MAX_QUOTE = 200


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """``repr(value)`` for an error message, at most about ``limit`` characters:
    a longer one is cut, with an ellipsis and the value's length. Never raises
    (a huge int is not turned into digits; a failing ``__repr__`` gives
    ``<Type object>``).

    >>> quote("x" * 1000)[190:]
    'xxxxxxxxxx... (1000 characters)'
    >>> quote(10**5000)
    '<int of 16610 bits>'
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4 * limit:
        return f"<int of {value.bit_length()} bits>"
    try:
        text = repr(value)
    except Exception:
        return f"<{type(value).__name__} object>"
    if not isinstance(text, str):
        return f"<{type(value).__name__} object>"
    if len(text) <= limit:
        return text
    try:
        unit = "characters" if isinstance(value, str) else "bytes" if isinstance(value, (bytes, bytearray)) else "items"
        size = f"{len(value)} {unit}"  # type: ignore[arg-type]
    except Exception:
        size = f"{len(text)} characters written out"
    return f"{text[:limit]}... ({size})"


class ConfigError(PatronusError, ValueError):
    """An invalid model input: names the field and the offending value.

    The message quotes at most about 200 characters of the value
    (:func:`quote`); ``value`` holds all of it.

    >>> from patronus import Match
    >>> Match(dst="10.0.0.1/8")
    Traceback (most recent call last):
    ...
    patronus.errors.ConfigError: Match.dst: '10.0.0.1/8' has host bits set (did you mean 10.0.0.0/8?)
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {quote(value)} {reason}")


class StateError(PatronusError):
    """The state file cannot be read or written (missing, corrupt, locked)."""


class SchemaVersionError(StateError):
    """The state file was written by a newer patronus (a newer schema version)."""


class DataplaneUnavailable(PatronusError):
    """A data plane backend cannot run here; the message names the cause and the fix."""

    def __init__(self, cause: str, fix: str) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} (fix: {fix})")


class MalformedProbe(PatronusError, ValueError):
    """A probe packet that does not decode; ``reason`` is one of
    ``patronus.paths.codec.MALFORMED_REASONS`` (what responders count).

    >>> from patronus.paths.codec import decode
    >>> decode(b"PN")
    Traceback (most recent call last):
    ...
    patronus.errors.MalformedProbe: short: 2 bytes, a probe has at least 40
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class ProbeUnavailable(PatronusError):
    """A probe method cannot run here (e.g. ICMP without permission); names the fix."""

    def __init__(self, cause: str, fix: str) -> None:
        self.cause = cause
        self.fix = fix
        super().__init__(f"{cause} (fix: {fix})")
