"""WireGuard keys: X25519 key pairs (through ``cryptography``) and preshared
keys. Private material never appears in a repr, a log line or an exception;
files holding it are written with mode 0600.

>>> k = PrivateKey.generate()
>>> len(k.public_key().base64)
44
>>> "PrivateKey(public=" in repr(k) and k.base64 not in repr(k)
True
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ConfigError

__all__ = ["PrivateKey", "PublicKey", "PresharedKey", "decode_key"]

_RAW = serialization.Encoding.Raw


def decode_key(text: str | bytes, field: str = "key") -> bytes:
    """32 key bytes from base64 (wg's format) or 64 hex digits (the UAPI's)."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    t = text.strip()
    try:
        raw = bytes.fromhex(t) if len(t) == 64 else base64.b64decode(t, validate=True)
    except (ValueError, binascii.Error):
        raise ConfigError(field, "<redacted>" if "private" in field or "preshared" in field else t,
                          "is neither base64 nor hex of 32 bytes") from None
    if len(raw) != 32:
        raise ConfigError(field, "<redacted>" if "private" in field or "preshared" in field else t,
                          f"decodes to {len(raw)} bytes, a key has 32")
    return raw


class PublicKey:
    """A peer's public key."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ConfigError("public_key", raw.hex(), "is not 32 bytes")
        self.raw = bytes(raw)

    @classmethod
    def from_text(cls, text: str) -> PublicKey:
        return cls(decode_key(text, "public_key"))

    @property
    def base64(self) -> str:
        return base64.b64encode(self.raw).decode()

    @property
    def hex(self) -> str:
        return self.raw.hex()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.base64!r})"

    __str__ = lambda self: self.base64  # noqa: E731


class _Secret:
    __slots__ = ("_raw",)

    def __init__(self, raw: bytes) -> None:
        if len(raw) != 32:
            raise ConfigError(type(self).__name__, "<redacted>", "is not 32 bytes")
        self._raw = bytes(raw)

    @property
    def base64(self) -> str:
        return base64.b64encode(self._raw).decode()

    @property
    def hex(self) -> str:
        return self._raw.hex()

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._raw == self._raw  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._raw))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the base64 key to ``path`` with mode 0600 (created that way,
        never world-readable for an instant), replacing it atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, (self.base64 + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]):  # type: ignore[no-untyped-def]
        """Read a key file; refuses one that others can read (like ssh)."""
        st = os.stat(path)
        if st.st_mode & 0o077:
            raise ConfigError(f"{cls.__name__} file", str(path),
                              f"is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
        return cls(decode_key(Path(path).read_text(), "private_key"))


class PrivateKey(_Secret):
    """An interface's private key."""

    @classmethod
    def generate(cls) -> PrivateKey:
        k = X25519PrivateKey.generate()
        return cls(k.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption()))

    @classmethod
    def from_text(cls, text: str) -> PrivateKey:
        return cls(decode_key(text, "private_key"))

    def public_key(self) -> PublicKey:
        pub = X25519PrivateKey.from_private_bytes(self._raw).public_key()
        return PublicKey(pub.public_bytes(_RAW, serialization.PublicFormat.Raw))

    def __repr__(self) -> str:
        return f"PrivateKey(public={self.public_key().base64!r})"

    __str__ = __repr__


class PresharedKey(_Secret):
    """A per-path symmetric key mixed into the handshake (post-quantum hedge)."""

    @classmethod
    def generate(cls) -> PresharedKey:
        return cls(os.urandom(32))

    @classmethod
    def from_text(cls, text: str) -> PresharedKey:
        return cls(decode_key(text, "preshared_key"))

    def __repr__(self) -> str:
        return "PresharedKey(<redacted>)"

    __str__ = __repr__
