"""A Python client of the controller's REST API that speaks in the library's
own objects: :class:`~patronus.model.Site`, :class:`~patronus.model.Policy`
and :class:`~patronus.mesh.Mesh` in, the same objects out.

    from patronus.client import Controller

    with Controller("https://127.0.0.1:8443", api_key=key, verify="ctl/tls.crt") as ctl:
        ctl.add_site(Site("hq", subnets=["10.1.0.0/24"], uplinks=[Uplink("isp1", "192.0.2.1")]))
        mesh = ctl.mesh()                 # a patronus.Mesh of the controller's sites and policies

Credentials (one of): ``api_key=`` (``pnk_...``, shown once when created),
``token=`` (an access token you got elsewhere; ``refresh_token=`` beside it
lets the client renew it), or ``username=`` and ``password=`` (and ``totp=``
when the user has TOTP): the client logs in at once and keeps the token
pair, not the password. An access token that the server reports expired is
renewed with the refresh token, once, and the request sent again; the
client also renews it shortly before its announced expiry.

Versions (ETags): every site or policy the client reads or writes one by one
(``site``, ``add_site``, ``replace_site``, ...) has its ETag remembered
under ``(kind, name)``; ``replace_*`` and ``remove_*`` send it as
``If-Match``, so replacing something another writer changed since raises
:class:`PreconditionFailed` (412) instead of silently undoing their change.
The lists (``sites()``, ``policies()``) carry no versions: read an object
with ``site(name)`` / ``policy(name)`` before replacing it. ``if_match=``
overrides the remembered version (``"*"``: replace whatever is there).

Errors: the server's RFC 9457 problem details become named exceptions, all
:class:`ControllerError` (a :class:`~patronus.errors.PatronusError`). A 422
naming a field is :class:`InvalidInput`, which is also a
:class:`patronus.ConfigError` with ``field``, ``value`` and ``reason`` and
the server's message: a script handles a refused site the same way whether
it talks to the library or to a controller.

This module needs httpx and nothing of the server: it never imports
``patronus.controller`` (nor FastAPI, uvicorn, argon2, ...).
"""

from __future__ import annotations

import ast
import io
import os
import ssl
import threading
import time
import tokenize
from collections.abc import Mapping
from typing import Any

import httpx

from .errors import ConfigError, PatronusError
from .mesh import Mesh
from .model import Failover, Policy, Site

__all__ = [
    "Controller", "ControllerError", "InvalidInput", "Unauthorized", "TotpRequired", "Forbidden", "NotFound",
    "Conflict", "PreconditionFailed", "RateLimited", "Unavailable", "PREFIX",
]

PREFIX = "/api/v1"
_REFRESH_MARGIN_S = 30.0     # renew an access token this long before its announced expiry


# -- errors ------------------------------------------------------------------------------


class ControllerError(PatronusError):
    """A request the controller refused. ``status`` is the HTTP status,
    ``title`` and ``detail`` come from the problem details, ``field`` names
    the offending field when the server says which, ``problem`` is the whole
    problem document (a dict; empty when the body was not one)."""

    status = 0

    def __init__(self, detail: str, *, status: int | None = None, title: str | None = None,
                 field: str | None = None, problem: Mapping[str, Any] | None = None) -> None:
        if status is not None:
            self.status = status
        self.title = title or ""
        self.detail = detail
        self.field = field
        self.problem = dict(problem or {})
        PatronusError.__init__(self, detail)   # not super(): InvalidInput's next base is ConfigError


class InvalidInput(ControllerError, ConfigError):
    """422: the model (or the request schema) refused the input; also a
    :class:`patronus.ConfigError` with ``field``, ``value``, ``reason``.
    ``value`` is recovered from the message when it can be (else None)."""

    status = 422

    def __init__(self, detail: str, *, status: int | None = None, title: str | None = None,
                 field: str | None = None, problem: Mapping[str, Any] | None = None) -> None:
        ControllerError.__init__(self, detail, status=status, title=title, field=field, problem=problem)
        self.field = field or ""
        self.value, self.reason = _value_and_reason(detail, self.field)


class Unauthorized(ControllerError):
    """401: no credential, or a bad, expired or revoked one (``detail`` says which)."""

    status = 401


class TotpRequired(Unauthorized):
    """401 on login: the user has TOTP; log in again with ``totp=`` (a code or a recovery code)."""


class Forbidden(ControllerError):
    """403: authenticated, but the role may not do this."""

    status = 403


class NotFound(ControllerError):
    """404: no such site, policy, user or key."""

    status = 404


class Conflict(ControllerError):
    """409: the change clashes with what is there (a name taken, a policy priority in use,
    a site a policy still needs)."""

    status = 409


class PreconditionFailed(ControllerError):
    """412: the object changed since it was read (``If-Match`` named an old version):
    a lost update refused. Read it again, apply the change again, replace again."""

    status = 412


class RateLimited(ControllerError):
    """429: too many requests or login attempts; ``retry_after`` seconds until the next."""

    status = 429

    def __init__(self, detail: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(detail, **kw)
        self.retry_after = retry_after


class Unavailable(ControllerError):
    """503: the controller cannot reach its store."""

    status = 503


_BY_STATUS: dict[int, type[ControllerError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 412: PreconditionFailed,
    422: InvalidInput, 429: RateLimited, 503: Unavailable,
}


def _value_and_reason(detail: str, field: str) -> tuple[Any, str]:
    """Split a model error's message ``"<field>: <repr of value> <reason>"``
    back into (value, reason); (None, the rest) when the value does not parse.

    >>> _value_and_reason("Site.subnets: ['10.0.0.1/8'] has host bits set", "Site.subnets")
    (['10.0.0.1/8'], 'has host bits set')
    >>> _value_and_reason("uplinks: Field required", "uplinks")
    (None, 'Field required')
    """
    rest = detail[len(field) + 2:] if field and detail.startswith(f"{field}: ") else detail
    end = None
    depth = 0
    try:
        for tok in tokenize.generate_tokens(io.StringIO(rest).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth -= 1
                if depth <= 0:
                    end = tok.end[1]
                    break
            elif depth == 0:
                if tok.type in (tokenize.STRING, tokenize.NUMBER) or tok.string in ("None", "True", "False"):
                    end = tok.end[1]
                    break
                if tok.string != "-":
                    break
        if end is not None:
            return ast.literal_eval(rest[:end]), rest[end:].strip()
    except (tokenize.TokenError, SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        pass
    return None, rest


def _error(r: httpx.Response) -> ControllerError:
    """The named exception for an error response (problem details or not)."""
    try:
        body = r.json()
    except ValueError:
        body = None
    problem = body if isinstance(body, dict) else {}
    detail = problem.get("detail") or problem.get("title") or r.reason_phrase or f"HTTP {r.status_code}"
    kw: dict[str, Any] = {"status": r.status_code, "title": problem.get("title") or r.reason_phrase,
                          "field": problem.get("field"), "problem": problem}
    cls = _BY_STATUS.get(r.status_code, ControllerError)
    if cls is InvalidInput and not kw["field"]:
        cls = ControllerError
    if cls is Unauthorized and problem.get("totp_required"):
        cls = TotpRequired
    if cls is RateLimited:
        try:
            retry = float(r.headers.get("retry-after", ""))
        except ValueError:
            retry = None
        return RateLimited(str(detail), retry_after=retry, **kw)
    return cls(str(detail), **kw)


# -- the client ----------------------------------------------------------------------------


class Controller:
    """A controller at ``url`` (``https://host:port``), as library objects.

    ``verify``: True (the system's CAs), a path to the controller's
    certificate (``tls.crt`` of its state directory, self-signed) or a CA
    bundle, an ``ssl.SSLContext``, or False (no verification: tests only).
    ``timeout`` in seconds per request. Use it as a context manager, or call
    :meth:`close`. Thread-safe (httpx's client is; a token refresh is locked).
    """

    def __init__(self, url: str, *, api_key: str | None = None, token: str | None = None,
                 refresh_token: str | None = None, username: str | None = None, password: str | None = None,
                 totp: str | None = None, verify: str | os.PathLike[str] | bool | ssl.SSLContext = True,
                 timeout: float = 10.0, transport: httpx.BaseTransport | None = None) -> None:
        if sum(x is not None for x in (api_key, token, password)) > 1:
            raise ConfigError("Controller", "<redacted>", "takes one credential: api_key=, token= or "
                              "username= with password=")
        if (username is None) != (password is None):
            raise ConfigError("Controller.username" if username is None else "Controller.password", None,
                              "is missing: username= and password= go together")
        if isinstance(verify, (str, os.PathLike)):
            verify = ssl.create_default_context(cafile=os.fspath(verify))
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, verify=verify, timeout=timeout, transport=transport,
                                  headers={"Accept": "application/json"})
        self._lock = threading.Lock()
        self._bearer: str | None = api_key or token
        self._refresh: str | None = refresh_token
        self._expires: float | None = None          # time.monotonic() at which the access token expires
        self._etags: dict[tuple[str, str], str] = {}
        if username is not None and password is not None:
            try:
                self.login(username, password, totp=totp)
            except BaseException:
                self._http.close()
                raise

    def __repr__(self) -> str:
        return f"Controller({self.url!r})"

    def __enter__(self) -> Controller:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections (the session stays valid: see :meth:`logout`)."""
        self._http.close()

    # -- plumbing ------------------------------------------------------------------------

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        h = dict(extra or {})
        if self._bearer:
            h["Authorization"] = f"Bearer {self._bearer}"
        return h

    def _request(self, method: str, path: str, *, json: Any = None, params: Mapping[str, Any] | None = None,
                 headers: Mapping[str, str] | None = None, auth: bool = True) -> httpx.Response:
        """Send; on an expired access token, refresh once and send again; raise
        the named error for any status >= 400."""
        url = PREFIX + path
        if auth and self._refresh and self._expires is not None and time.monotonic() >= self._expires:
            self._renew(self._bearer)
        sent = self._bearer
        r = self._http.request(method, url, json=json, params=params,
                               headers=self._headers(headers) if auth else dict(headers or {}))
        if (r.status_code == 401 and auth and self._refresh and sent is not None
                and not sent.startswith("pnk_") and _detail(r) == "token expired"):
            self._renew(sent)
            r = self._http.request(method, url, json=json, params=params, headers=self._headers(headers))
        if r.status_code >= 400:
            raise _error(r)
        return r

    def _renew(self, stale: str | None) -> None:
        with self._lock:
            if self._bearer != stale:    # another thread renewed it meanwhile
                return
            self.refresh()

    def _take(self, tokens: Mapping[str, Any]) -> dict[str, Any]:
        self._bearer = tokens["access_token"]
        self._refresh = tokens.get("refresh_token")
        expires_in = tokens.get("expires_in")
        self._expires = (time.monotonic() + max(float(expires_in) - _REFRESH_MARGIN_S, 0.0)
                         if isinstance(expires_in, (int, float)) else None)
        return dict(tokens)

    def _remember(self, kind: str, name: str, r: httpx.Response) -> None:
        etag = r.headers.get("etag")
        if etag:
            self._etags[(kind, name)] = etag
        else:
            self._etags.pop((kind, name), None)

    def _if_match(self, kind: str, name: str, if_match: str | None) -> dict[str, str]:
        tag = if_match if if_match is not None else self._etags.get((kind, name))
        return {"If-Match": tag} if tag else {}

    def etag(self, kind: str, name: str) -> str | None:
        """The remembered version of a ``"site"`` or ``"policy"``, or None."""
        return self._etags.get((kind, name))

    # -- auth ------------------------------------------------------------------------------

    def login(self, username: str, password: str, *, totp: str | None = None) -> dict[str, Any]:
        """Log in; the client then uses the new session. Returns the token
        pair (``access_token``, ``refresh_token``, ``expires_in``).
        :class:`TotpRequired` when the user has TOTP and ``totp`` is missing."""
        body: dict[str, Any] = {"name": username, "password": password}
        if totp is not None:
            body["totp"] = totp
        return self._take(self._request("POST", "/auth/login", json=body, auth=False).json())

    def refresh(self) -> dict[str, Any]:
        """Rotate the refresh token for a new pair now (the client does this by
        itself when the access token expires). :class:`Unauthorized` when
        there is no session to refresh or the server refuses it."""
        if not self._refresh:
            raise Unauthorized("no refresh token: log in with username= and password= (or pass refresh_token=)",
                               status=401)
        return self._take(self._request("POST", "/auth/refresh", json={"refresh_token": self._refresh},
                                        auth=False).json())

    def logout(self) -> None:
        """End the session on the server (access and refresh tokens revoked at
        once) and forget it here. With an API key it only forgets the key
        (revoke a key with :meth:`revoke_api_key`)."""
        bearer, refresh = self._bearer, self._refresh
        try:
            if bearer and not bearer.startswith("pnk_"):
                self._request("POST", "/auth/logout", json={"refresh_token": refresh} if refresh else None)
        finally:
            self._bearer = self._refresh = self._expires = None

    def me(self) -> dict[str, Any]:
        """Who the credential is: ``name``, ``role``, ``kind`` (user or apikey), ``key_id``."""
        return dict(self._request("GET", "/auth/me").json())

    def create_api_key(self, name: str, role: str, expires_s: float | None = None) -> str:
        """A new API key (admin only); returns its secret, which the server
        shows this once and keeps only hashed."""
        body: dict[str, Any] = {"name": name, "role": getattr(role, "value", role)}
        if expires_s is not None:
            body["expires_s"] = expires_s
        return str(self._request("POST", "/api-keys", json=body).json()["secret"])

    def api_keys(self) -> list[dict[str, Any]]:
        """Every API key's metadata (id, name, role, expiry, last use; never the secret)."""
        return list(self._request("GET", "/api-keys").json()["items"])

    def revoke_api_key(self, key_id: str) -> None:
        self._request("DELETE", f"/api-keys/{_segment(key_id)}")

    def users(self) -> list[dict[str, Any]]:
        return list(self._request("GET", "/users").json()["items"])

    def add_user(self, name: str, password: str, role: str) -> None:
        self._request("POST", "/users", json={"name": name, "password": password,
                                              "role": getattr(role, "value", role)})

    def update_user(self, name: str, *, role: str | None = None, disabled: bool | None = None,
                    password: str | None = None) -> dict[str, Any]:
        """Change a user (admin only): a new ``role`` (applies to the user's
        next request), ``disabled`` True or False (disabling ends every
        session at once), a new ``password`` (every session ends). Returns
        the user's record; :class:`Conflict` for the last enabled admin."""
        body: dict[str, Any] = {}
        if role is not None:
            body["role"] = getattr(role, "value", role)
        if disabled is not None:
            body["disabled"] = disabled
        if password is not None:
            body["password"] = password
        return dict(self._request("PATCH", f"/users/{_segment(name)}", json=body).json())

    def remove_user(self, name: str) -> None:
        self._request("DELETE", f"/users/{_segment(name)}")

    # -- sites -------------------------------------------------------------------------------

    def sites(self) -> list[Site]:
        """Every site, in the mesh's order."""
        return [Site.from_dict(d) for d in self._request("GET", "/sites").json()["items"]]

    def site(self, name: str) -> Site:
        """One site (:class:`NotFound` if there is none); its version is remembered."""
        r = self._request("GET", f"/sites/{_segment(name)}")
        self._remember("site", name, r)
        return Site.from_dict(r.json())

    def add_site(self, site: Site | Mapping[str, Any]) -> Site:
        """Add a site; the site as stored. :class:`Conflict` when the name is
        taken, :class:`InvalidInput` (a ConfigError) when the mesh refuses it."""
        r = self._request("POST", "/sites", json=_body(site))
        out = Site.from_dict(r.json())
        self._remember("site", out.name, r)
        return out

    def replace_site(self, site: Site | Mapping[str, Any], *, if_match: str | None = None) -> Site:
        """Replace the site of the same name, if it is still the version this
        client last saw (:class:`PreconditionFailed` if not)."""
        body = _body(site)
        name = str(body.get("name"))
        r = self._request("PUT", f"/sites/{_segment(name)}", json=body,
                          headers=self._if_match("site", name, if_match))
        self._remember("site", name, r)
        return Site.from_dict(r.json())

    def remove_site(self, name: str, *, if_match: str | None = None) -> None:
        """Remove a site (:class:`Conflict` while a policy needs it)."""
        self._request("DELETE", f"/sites/{_segment(name)}", headers=self._if_match("site", name, if_match))
        self._etags.pop(("site", name), None)

    # -- policies ------------------------------------------------------------------------------

    def policies(self) -> list[Policy]:
        """Every policy, in the mesh's order."""
        return [Policy.from_dict(d) for d in self._request("GET", "/policies").json()["items"]]

    def policy(self, name: str) -> Policy:
        r = self._request("GET", f"/policies/{_segment(name)}")
        self._remember("policy", name, r)
        return Policy.from_dict(r.json())

    def add_policy(self, policy: Policy | Mapping[str, Any]) -> Policy:
        """Add a policy (:class:`Conflict` when its name or priority is taken)."""
        r = self._request("POST", "/policies", json=_body(policy))
        out = Policy.from_dict(r.json())
        self._remember("policy", out.name, r)
        return out

    def replace_policy(self, policy: Policy | Mapping[str, Any], *, if_match: str | None = None) -> Policy:
        body = _body(policy)
        name = str(body.get("name"))
        r = self._request("PUT", f"/policies/{_segment(name)}", json=body,
                          headers=self._if_match("policy", name, if_match))
        self._remember("policy", name, r)
        return Policy.from_dict(r.json())

    def remove_policy(self, name: str, *, if_match: str | None = None) -> None:
        self._request("DELETE", f"/policies/{_segment(name)}", headers=self._if_match("policy", name, if_match))
        self._etags.pop(("policy", name), None)

    def failover(self) -> Failover:
        """The mesh's failover settings."""
        r = self._request("GET", "/failover")
        self._remember("failover", "", r)
        return Failover.from_dict(r.json())

    def set_failover(self, failover: Failover | Mapping[str, Any], *, if_match: str | None = None) -> Failover:
        """Replace the failover settings (guarded by the ETag of the last read,
        or ``if_match``); every agent gets them with its next desired state.

        >>> ctl.set_failover(Failover(failback_hold_s=5))  # doctest: +SKIP
        """
        body = failover.to_dict() if isinstance(failover, Failover) else dict(failover)
        r = self._request("PUT", "/failover", json=body, headers=self._if_match("failover", "", if_match))
        self._remember("failover", "", r)
        return Failover.from_dict(r.json())

    # -- views ----------------------------------------------------------------------------------

    def paths(self) -> list[dict[str, Any]]:
        """Every path of the full mesh: ``id``, ``index``, ``sites``, ``uplinks``."""
        return list(self._request("GET", "/paths").json()["items"])

    def topology(self) -> dict[str, Any]:
        """``mesh`` (its name), ``nodes`` (sites) and ``edges`` (paths)."""
        return dict(self._request("GET", "/topology").json())

    def events(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest failover events, oldest first."""
        return list(self._request("GET", "/events", params={"limit": limit}).json()["items"])

    def mesh(self) -> Mesh:
        """A :class:`~patronus.Mesh` of the controller's sites and policies,
        validated by the library as it is built (three reads, not one
        snapshot: a change between them may show). Custom application
        profiles are not served yet, so they are the built-in ones."""
        name = self.topology()["mesh"]
        sites, policies = self.sites(), self.policies()
        return Mesh.from_dict({"name": name, "sites": [s.to_dict() for s in sites],
                               "policies": [p.to_dict() for p in policies],
                               "failover": self.failover().to_dict()})


def _detail(r: httpx.Response) -> str | None:
    try:
        body = r.json()
    except ValueError:
        return None
    return body.get("detail") if isinstance(body, dict) else None


def _body(obj: Site | Policy | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON body of a site or policy: its ``to_dict``, or a mapping as
    given (the server validates it, so a script can send raw input)."""
    if isinstance(obj, (Site, Policy)):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return dict(obj)
    raise ConfigError("body", obj, "is not a Site, a Policy or a mapping")


def _segment(name: str) -> str:
    """A name as one URL path segment (no '/', '?', '#' or '..' smuggled into the path)."""
    if not isinstance(name, str) or not name or name in (".", "..") or any(c in name for c in "/?#%\\"):
        raise ConfigError("name", name, "is not a name (no '/', '?', '#', '%' or '\\', not '.' or '..')")
    return name
