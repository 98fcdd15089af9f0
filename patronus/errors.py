"""Named errors of patronus. Every invalid input raises one of these."""

from __future__ import annotations

__all__ = ["PatronusError", "ConfigError", "StateError", "SchemaVersionError", "DataplaneUnavailable", "MalformedProbe",
           "ProbeUnavailable"]


class PatronusError(Exception):
    """Base class of every error patronus raises on purpose."""


class ConfigError(PatronusError, ValueError):
    """An invalid model input: names the field and the offending value.

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
        super().__init__(f"{field}: {value!r} {reason}")


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
