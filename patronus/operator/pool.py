"""The controller as the operator sees it: one or several replicas behind
one object, :class:`ControllerPool`, and the few reads of live state the
status refresh needs (:class:`LiveState`, cached for a few seconds so that a
hundred resources refreshing together cost one round of requests).

Failing over works as the agent's does: a request that surely went nowhere
(the connection was refused or never made) or that a replica answered with
503 (it cannot reach its store) is sent to the next address, each address
once per call; any other error is the caller's. The API key is sent as a
bearer token and never appears in a log line, an error message or a
``repr``.

>>> pool = ControllerPool("https://ctl-0:8443, https://ctl-1:8443", api_key="pnk_x")
>>> pool.urls, pool
(['https://ctl-0:8443', 'https://ctl-1:8443'], ControllerPool('https://ctl-0:8443'))
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from ..client import Controller, Unavailable
from ..errors import ConfigError, PatronusError

__all__ = ["ControllerPool", "OperatorStopping", "LiveState", "Route", "tls_context", "routes_from_events", "MAX_URLS",
           "MAX_EVENTS"]

T = TypeVar("T")

MAX_URLS = 16          # controller replicas one --controller may name
MAX_EVENTS = 10_000    # failover events read per refresh (the controller's own limit)
_FAILOVER = (httpx.ConnectError, httpx.ConnectTimeout)   # the request surely went nowhere


class OperatorStopping(PatronusError):
    """The operator is shutting down: no new request to the controller is started."""


class _Client(Controller):
    """:class:`patronus.client.Controller` plus the agents' records
    (``GET /api/v1/agents``, which the library client does not wrap)."""

    def agents(self) -> list[dict[str, Any]]:
        """Every agent: ``site``, ``status`` (Active, Degraded, Inactive, Revoked), ``last_seen``..."""
        return list(self._request("GET", "/agents").json()["items"])


class ControllerPool:
    """Controller replicas at ``urls`` (a comma-separated string or a list of
    ``https://host:port``) used as one, with ``api_key``.

    ``verify``: True (the system's CAs), a path to the controller's
    certificate or CA bundle, or an ``ssl.SSLContext``. ``timeout``: seconds
    per request (connect, read, write). :attr:`stopping`, once set, refuses
    new requests (:class:`OperatorStopping`) so a shutdown only waits for the
    one in flight. Thread-safe: kopf runs handlers in worker threads.
    """

    def __init__(self, urls: str | Sequence[str], *, api_key: str,
                 verify: str | os.PathLike[str] | bool | ssl.SSLContext = True, timeout: float = 5.0) -> None:
        raw = urls.split(",") if isinstance(urls, str) else list(urls)
        self.urls: list[str] = []
        for u in raw:
            u = str(u).strip().rstrip("/")
            try:
                parts = urlsplit(u)
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                parts = urlsplit("")
            if parts.scheme != "https" or not parts.hostname or parts.path or parts.query or parts.fragment:
                raise ConfigError("--controller", u, "is not an https://host:port URL (several, for controller "
                                                     "replicas, separated by commas)")
            self.urls.append(u)
        if not self.urls or len(self.urls) > MAX_URLS:
            raise ConfigError("--controller", urls, f"names {len(self.urls)} addresses: give 1 to {MAX_URLS}")
        if not isinstance(api_key, str) or not api_key.strip() or len(api_key) > 4096 or any(
                c.isspace() for c in api_key.strip()):
            raise ConfigError("API key", "<redacted>", "is empty, too long or has spaces inside")
        if not 0 < timeout <= 300:
            raise ConfigError("timeout", timeout, "is not in (0, 300] seconds")
        if isinstance(verify, (str, os.PathLike)):
            verify = ssl.create_default_context(cafile=os.fspath(verify))
        self._key = api_key.strip()
        self._verify = verify
        self.timeout = timeout
        self._clients: list[_Client | None] = [None] * len(self.urls)
        self._at = 0
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def __repr__(self) -> str:
        return f"ControllerPool({self.url!r})"

    @property
    def url(self) -> str:
        """The address requests go to first."""
        return self.urls[self._at]

    def _client(self, i: int) -> _Client:
        with self._lock:
            c = self._clients[i]
            if c is None:
                c = self._clients[i] = _Client(self.urls[i], api_key=self._key, verify=self._verify,
                                               timeout=self.timeout)
            return c

    def call(self, fn: Callable[[_Client], T]) -> T:
        """``fn(client)`` with the current replica; on a connection that
        was never made, or a 503, again with the next one (each once). ``fn``
        must be safe to repeat (a read, or an idempotent write)."""
        last: BaseException | None = None
        start = self._at
        for k in range(len(self.urls)):
            if self.stopping.is_set():
                raise OperatorStopping("the operator is stopping: no new request to the controller")
            i = (start + k) % len(self.urls)
            try:
                out = fn(self._client(i))
            except (*_FAILOVER, Unavailable) as e:
                last = e
                continue
            self._at = i
            return out
        assert last is not None
        if len(self.urls) > 1:   # every replica failed: start with the next one next time
            self._at = (start + 1) % len(self.urls)
        raise last

    def check(self) -> dict[str, Any]:
        """Who the API key is (``GET /api/v1/auth/me``): the controller answers
        and takes the key. Raises what the request raised."""
        return self.call(lambda c: c.me())

    def close(self) -> None:
        with self._lock:
            for c in self._clients:
                if c is not None:
                    c.close()
            self._clients = [None] * len(self.urls)


def tls_context(path: str | os.PathLike[str]) -> ssl.SSLContext:
    """TLS that trusts the certificates in ``path`` (``--ca``). A file with
    exactly one self-signed certificate (what ``patronus controller init``
    makes) is the controller's identity itself: it is pinned and the host
    name is not checked (the controller is reached by a Service name its
    certificate does not carry); a CA bundle checks host names as usual."""
    from cryptography import x509

    try:
        pem = open(path, "rb").read(1 << 20)
    except OSError as e:
        raise ConfigError("--ca", os.fspath(path), f"cannot be read: {e.strerror or e}") from None
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError("--ca", os.fspath(path), "holds no PEM certificate") from None
    ctx = ssl.create_default_context(cadata=pem.decode("ascii", "replace"))
    if len(certs) == 1 and certs[0].issuer == certs[0].subject:
        ctx.check_hostname = False   # the pinned certificate is the identity, whatever name it carries
    return ctx


# -- live state --------------------------------------------------------------------------------

Route = dict[str, str]   # {"site", "remoteSite", "path"} ("" as path: the agent has no usable path)


class LiveState:
    """What the controller knows now, read at most once every ``ttl_s``
    seconds per kind of data, shared by every resource's status refresh.

    - ``sites()`` / ``policies()``: the controller's objects by name (dicts
      in the model's form);
    - ``agents()``: site -> the status of its best agent (Active, Degraded,
      Inactive, Revoked; the controller's rule, as GraphQL's ``Site.status``);
    - ``paths()``: every path with its state (``status`` up, down or damped
      from the agents' BFD and failover reports, None while unknown);
    - ``routes()``: policy -> the path each (site, remote site) pair of it
      uses, from the newest of the controller's latest :data:`MAX_EVENTS`
      failover events (an ``initial`` placement or a move) of that pair.
    """

    _BEST = {"Active": 0, "Degraded": 1, "Inactive": 2, "Revoked": 3}

    def __init__(self, pool: ControllerPool, *, ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.pool = pool
        self.ttl_s = ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, Any]] = {}
        self._locks = {k: threading.Lock() for k in ("sites", "policies", "agents", "paths", "routes")}

    def _get(self, key: str, fetch: Callable[[_Client], Any]) -> Any:
        with self._locks[key]:   # one fetch at a time per kind; the others wait for its result
            hit = self._cache.get(key)
            if hit is not None and self.clock() - hit[0] < self.ttl_s:
                return hit[1]
            value = self.pool.call(fetch)
            self._cache[key] = (self.clock(), value)
            return value

    def invalidate(self) -> None:
        """Forget everything (the next read asks the controller)."""
        self._cache.clear()

    def sites(self) -> dict[str, dict[str, Any]]:
        return self._get("sites", lambda c: {s.name: s.to_dict() for s in c.sites()})

    def policies(self) -> dict[str, dict[str, Any]]:
        return self._get("policies", lambda c: {p.name: p.to_dict() for p in c.policies()})

    def agents(self) -> dict[str, str]:
        def fetch(c: _Client) -> dict[str, str]:
            out: dict[str, str] = {}
            for a in c.agents():
                site, status = a.get("site"), a.get("status")
                if not isinstance(site, str) or not isinstance(status, str):
                    continue
                cur = out.get(site)
                if cur is None or self._BEST.get(status, 9) < self._BEST.get(cur, 9):
                    out[site] = status
            return out

        return self._get("agents", fetch)

    def paths(self) -> list[dict[str, Any]]:
        return self._get("paths", lambda c: c.paths())

    def routes(self) -> dict[str, list[Route]]:
        return self._get("routes", lambda c: routes_from_events(c.events(limit=MAX_EVENTS)))


def routes_from_events(events: Sequence[dict[str, Any]]) -> dict[str, list[Route]]:
    """Policy -> its routes, sorted by (site, remoteSite), from failover
    events oldest first: the newest move of each (policy, site, remote site)
    wins. The local site of a move is the end of its path that is not the
    remote site. Path-level events (no policy) and the default class are
    left out.

    >>> evs = [{"policy": "voip", "site": "b", "from_path": None, "to_path": "a.x~b.y"},
    ...        {"policy": "voip", "site": "b", "from_path": "a.x~b.y", "to_path": "a.z~b.y"},
    ...        {"policy": "voip", "site": "a", "from_path": None, "to_path": None},
    ...        {"policy": None, "site": None, "from_path": "a.x~b.y", "to_path": None}]
    >>> routes_from_events(evs)
    {'voip': [{'site': 'a', 'remoteSite': 'b', 'path': 'a.z~b.y'}]}
    """
    latest: dict[tuple[str, str, str], str] = {}
    for e in events:
        policy, remote = e.get("policy"), e.get("site")
        if not isinstance(policy, str) or not isinstance(remote, str) or policy == "(default)":
            continue
        to, frm = e.get("to_path"), e.get("from_path")
        ref = to if isinstance(to, str) else frm if isinstance(frm, str) else None
        if ref is None:
            continue   # no path on either side: which site reported it is unknown
        ends = {part.split(".", 1)[0] for part in ref.split("~")}
        local = [s for s in ends if s != remote]
        if len(local) != 1 or remote not in ends:
            continue
        latest[(policy, local[0], remote)] = to if isinstance(to, str) else ""
    out: dict[str, list[Route]] = {}
    for (policy, site, remote), path in sorted(latest.items()):
        out.setdefault(policy, []).append({"site": site, "remoteSite": remote, "path": path})
    return out
