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
import errno
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..errors import ConfigError

__all__ = ["PrivateKey", "PublicKey", "PresharedKey", "decode_key", "write_secret_file", "read_secret_file"]

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


def write_secret_file(path: str | os.PathLike[str], data: bytes, *, replace: bool = True) -> bool:
    """Write ``data`` to ``path`` with mode 0600, atomically.

    The bytes go to a temporary file of an unpredictable name in the same
    directory, opened with O_CREAT|O_EXCL|O_NOFOLLOW and mode 0600 (a file or
    symlink planted there makes the open fail instead of being reused or
    followed), are fsync'd, and the file is renamed over ``path`` (a symlink
    at ``path`` is replaced, never written through). With ``replace=False``
    it is hard-linked instead, so an existing ``path`` is kept and False is
    returned (two writers racing: the first one wins)."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    for _ in range(10):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600)
            break
        except FileExistsError:
            continue
    else:
        raise ConfigError("key file", str(path), "cannot make a temporary file beside it")
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
            written = True
        else:
            try:
                os.link(tmp, path, follow_symlinks=False)
                written = True
            except FileExistsError:
                written = False
            os.unlink(tmp)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # the rename itself durable
        dfd = os.open(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return written


def read_secret_file(path: str | os.PathLike[str], what: str = "key file") -> bytes:
    """The bytes of a secret file, refused (ConfigError) unless it is a
    regular file, not a symlink, owned by this user and unreadable by others."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ConfigError(what, str(path), "is a symlink; a key file must be a regular file") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(what, str(path), "is not a regular file")
        if st.st_uid != os.geteuid():
            raise ConfigError(what, str(path), f"is owned by uid {st.st_uid}, not by this user ({os.geteuid()})")
        if st.st_mode & 0o077:
            raise ConfigError(what, str(path),
                              f"is readable by others (mode {st.st_mode & 0o777:o}); chmod 600 it")
        chunks = []
        while chunk := os.read(fd, 4096):
            chunks.append(chunk)
            if sum(map(len, chunks)) > 4096:
                raise ConfigError(what, str(path), "is too large for a key file")
        return b"".join(chunks)
    finally:
        os.close(fd)


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
        never world-readable for an instant), replacing it atomically
        (``write_secret_file``: an unpredictable temporary name opened
        O_EXCL|O_NOFOLLOW, fsync, rename)."""
        write_secret_file(path, (self.base64 + "\n").encode())

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
