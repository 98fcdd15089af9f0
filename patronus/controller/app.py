"""The controller's REST API (FastAPI): a thin layer over the service
(:mod:`patronus.controller.service`) and the auth core
(:mod:`patronus.controller.auth`).

Everything is under ``/api/v1``; the OpenAPI document is
``/api/v1/openapi.json`` (it needs a login too; no docs UI, so no CDN).
Every route but ``/healthz``, ``/livez`` and ``/readyz`` authenticates: the
two that take credentials in their body (login, refresh) are marked
:data:`CREDENTIALS`, every other route declares its RBAC action with
``Depends(require("sites.write"))``. :data:`ROUTE_ACTIONS` maps each
``(method, path)`` to its action (or :data:`PUBLIC` / :data:`CREDENTIALS`);
``create_app`` refuses to build an app with a route that has none.

``GET /metrics`` is the Prometheus exposition (:mod:`patronus.controller.metrics`;
action ``topology.read``, so any role's token or API key scrapes it).

Errors are RFC 9457 problem details (``application/problem+json``); a
model error names its ``field``; 429 carries ``Retry-After``. Request
bodies over :data:`MAX_BODY` bytes are refused with 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any, Literal

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, StateError
from ..model import Failover
from . import agents as _agents
from .rbac import CREDENTIALS, PUBLIC, _remote, _role, credentials, public, require
from . import auth as _auth
from . import metrics as _metrics
from .problems import PROBLEM_JSON, ServiceError, problem
from .service import Resource, Service

log = logging.getLogger("patronus.controller")

__all__ = ["create_app", "require", "ROUTE_ACTIONS", "PUBLIC", "CREDENTIALS", "MAX_BODY", "PREFIX"]

PREFIX = "/api/v1"
MAX_BODY = 1 << 20

_TIME = "seconds since the epoch, or RFC 3339 (2024-05-01T12:00:00Z); start inclusive, end exclusive"

#: (method, path) -> the RBAC action of the route, or PUBLIC / CREDENTIALS;
#: filled by create_app from each route's ``require`` / ``public`` / ``credentials`` dependency.
ROUTE_ACTIONS: dict[tuple[str, str], str] = {}

# -- request bodies (the library model validates the content) -------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UplinkIn(_Body):
    name: str
    address: str
    mtu: int = 1500
    port: int | None = None
    nat: bool = False
    bandwidth_mbps: float | None = None
    cost: int = 0


class SiteIn(_Body):
    name: str | None = Field(None, description="optional on PUT (the URL names the site)")
    subnets: list[str]
    uplinks: list[UplinkIn]


_Ports = int | str | list[int | list[int]] | None


class MatchIn(_Body):
    src: str | None = None
    dst: str | None = None
    src_ports: _Ports = None
    dst_ports: _Ports = None
    proto: int | str | list[int | str] | None = None
    dscp: int | None = None


class QoSIn(_Body):
    dscp: int | None = None
    rate_kbps: int | None = None
    duplicate: bool = False


class PolicyIn(_Body):
    name: str | None = Field(None, description="optional on PUT (the URL names the policy)")
    match: MatchIn
    priority: int
    app: str = "default"
    qos: QoSIn | None = None
    prefer: list[str] = []
    action: str = "forward"


_FO = Failover()   # the model's defaults, once


class FailoverIn(_Body):
    detect_ms: int = Field(_FO.detect_ms, description="BFD detection time; the BFD interval is detect_ms // multiplier")
    multiplier: int = _FO.multiplier
    failback_hold_s: float = Field(_FO.failback_hold_s,
                                   description="how long a path must be healthy before traffic returns")
    sla_windows: int = _FO.sla_windows
    cooldown_s: float = _FO.cooldown_s
    damp_penalty: float = _FO.damp_penalty
    damp_half_life_s: float = _FO.damp_half_life_s
    damp_reuse: float = _FO.damp_reuse
    damp_suppress: float = _FO.damp_suppress


class LoginIn(_Body):
    name: str = Field(max_length=256)
    password: str = Field(max_length=1024)
    totp: str | None = Field(None, max_length=64, description="a TOTP code or a recovery code")


class RefreshIn(_Body):
    refresh_token: str = Field(max_length=4096)


class LogoutIn(_Body):
    refresh_token: str | None = Field(None, max_length=4096)


class TotpConfirmIn(_Body):
    code: str = Field(max_length=64)


class UserIn(_Body):
    name: str = Field(max_length=256)
    password: str = Field(max_length=1024)
    role: Literal["admin", "operator", "viewer"]


class UserPatchIn(_Body):
    role: Literal["admin", "operator", "viewer"] | None = None
    disabled: StrictBool | None = Field(None, description="true: the user cannot log in and every session ends")
    password: str | None = Field(None, max_length=1024, description="a new password: every session ends")


class ApiKeyIn(_Body):
    name: str = Field(max_length=256)
    role: Literal["admin", "operator", "viewer"]
    expires_s: float | None = Field(None, gt=0, description="seconds until it expires (none: never)")


# -- responses ---------------------------------------------------------------------------


def _problem(status: int, detail: str | None = None, *, title: str | None = None, field: str | None = None,
             headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    if title is None:
        try:
            title = HTTPStatus(status).phrase
        except ValueError:
            title = "Error"
    return JSONResponse(problem(status, title, detail, field=field, **extra), status_code=status,
                        media_type=PROBLEM_JSON, headers=headers)


def _resource(r: Resource, status: int = 200, location: str | None = None) -> JSONResponse:
    headers = {"ETag": r.etag}
    if location:
        headers["Location"] = location
    return JSONResponse(r.data, status_code=status, headers=headers)


def _tokens(pair: Any) -> dict[str, Any]:
    return {"access_token": pair.access, "refresh_token": pair.refresh, "token_type": "bearer",
            "expires_in": pair.expires_in}


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or ".".join(map(str, loc))


class _BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes. A declared
    Content-Length is checked before anything is read (the server holds the
    client to it); a body without one (chunked) is read here, at most
    ``limit`` bytes, and handed on in one piece."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for k, val in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    declared = int(val)
                except ValueError:
                    await _problem(400, "Content-Length is not a number")(scope, receive, send)
                    return
        if declared is not None:
            if declared > self.limit:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":
                return   # the client went away
            body = msg.get("body", b"")
            size += len(body)
            if size > self.limit:
                await self._refuse(scope, receive, send)
                return
            chunks.append(body)
            if not msg.get("more_body", False):
                break
        done = False

        async def replay() -> Any:
            nonlocal done
            if not done:
                done = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        await _problem(413, f"the request body is larger than {self.limit} bytes",
                       headers={"Connection": "close"})(scope, receive, send)


# -- the app -----------------------------------------------------------------------------


def _api_routes(routes: Any) -> Any:
    """Every APIRoute, also those of included routers (FastAPI keeps an
    included router as one entry whose routes carry their full paths)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif hasattr(route, "original_router"):
            yield from _api_routes(route.original_router.routes)


HOUSEKEEPING_S = 60.0   # retention of telemetry, metrics, flows and expired credentials, this often


def housekeeping(app: Any, *, shared: bool = True) -> dict[str, int]:
    """One round of retention: the state file's (``Service.prune``), raw
    agent telemetry's (``AgentStore.prune``) and, with ``shared``, expired
    refresh tokens and revocations (``Auth.prune``) and old change events;
    rows deleted by what. Replicas on etcd: every replica prunes its own
    files, the leader alone what they share."""
    out = {f"state.{k}": v for k, v in app.state.service.prune(shared=shared).items()}
    out["agent_telemetry"] = app.state.agents.agent_store.prune()
    if shared:
        out["credentials"] = app.state.auth.prune()
    return out


async def _housekeeping(app: Any) -> None:
    loop = asyncio.get_running_loop()
    leader = getattr(app.state, "leader", None)
    while True:
        await asyncio.sleep(HOUSEKEEPING_S)
        shared = leader is None or leader.is_leader   # replicas: the elected one prunes what they share
        try:
            done = await loop.run_in_executor(None, functools.partial(housekeeping, app, shared=shared))
            if any(done.values()):
                log.info("retention: deleted %s", ", ".join(f"{v} {k}" for k, v in done.items() if v))
        except Exception:   # a busy store: next round
            log.exception("retention round failed")


class _StaleReads:
    """ASGI middleware: a response built from reads that answered from one
    etcd member's copy (the cluster without quorum) says so:
    ``Warning: 110 - "Response is Stale"`` (RFC 7234) and
    ``X-Patronus-Stale: true``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from .etcd import stale_reads

        with stale_reads() as box:
            async def send_marked(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start" and box[0]:
                    message = {**message, "headers": [*message.get("headers", []),
                                                      (b"warning", b'110 - "Response is Stale"'),
                                                      (b"x-patronus-stale", b"true")]}
                await send(message)

            await self.app(scope, receive, send_marked)


def create_app(service: Service, auth: Any, *, docs: bool = False, graphql: bool = True,
               graphql_introspection: bool = True, leader: Any = None, replica: str | None = None) -> FastAPI:
    """The REST application over ``service`` and ``auth``.

    ``docs=True`` serves the Swagger UI at /api/v1/docs (it loads its
    scripts from a CDN, hence off by default). ``leader``: a
    :class:`patronus.controller.etcd.Leadership` (replicas on etcd) gating
    the singleton work (retention), started and stopped with the app;
    ``replica`` names this replica (in /readyz)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.bind_loop()
        if leader is not None:
            service.watch_hooks.append(leader.on_watch)   # the role taken as soon as its holder's key goes
            leader.start()
        keeper = asyncio.ensure_future(_housekeeping(app))
        try:
            yield
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if leader is not None:
                await asyncio.get_running_loop().run_in_executor(None, leader.stop)
            service.close()

    app = FastAPI(title="patronus controller", version="1", openapi_url=None, docs_url=None, redoc_url=None,
                  lifespan=lifespan)
    app.state.service = service
    app.state.auth = auth
    app.state.leader = leader
    app.state.replica = replica
    db = service.db

    # -- errors --------------------------------------------------------------------

    def auth_error(request: Request, exc: Exception) -> JSONResponse:
        request.app.state.metrics.auth_failure(exc)
        headers = {}
        status = int(getattr(exc, "status", 401))
        retry = getattr(exc, "retry_after", None)
        if retry is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry)))
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="patronus"'
        extra = {"totp_required": True} if isinstance(exc, _auth.TotpRequired) else {}
        return _problem(status, str(exc), title=getattr(exc, "title", None), headers=headers, **extra)

    app.add_exception_handler(_auth.ControllerError, auth_error)

    @app.exception_handler(ServiceError)
    def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _problem(exc.status, exc.detail, title=exc.title, field=exc.field)

    @app.exception_handler(ConfigError)
    def config_error(request: Request, exc: ConfigError) -> JSONResponse:
        return _problem(422, str(exc), field=exc.field)

    @app.exception_handler(StateError)
    def state_error(request: Request, exc: StateError) -> JSONResponse:
        return _problem(503, str(exc))

    @app.exception_handler(RequestValidationError)
    def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        field = _field(first.get("loc", ()))
        errors = [{"field": _field(e.get("loc", ())), "detail": e.get("msg", "")} for e in errs[:20]]
        return _problem(422, f"{field}: {first.get('msg', 'invalid')}", field=field, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _problem(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    # -- health (no auth) ------------------------------------------------------------

    @app.get("/healthz", dependencies=[Depends(public)], tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/livez", dependencies=[Depends(public)], tags=["health"])
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", dependencies=[Depends(public)], tags=["health"])
    def readyz() -> Any:
        service.ready()
        out: dict[str, Any] = {"status": "ready", "store": getattr(service.db, "kind", "sqlite")}
        if replica is not None:
            out["replica"] = replica
        if leader is not None:
            out["leader"] = leader.is_leader
        return out

    # -- the OpenAPI document (any authenticated principal) ------------------------------

    @app.get(f"{PREFIX}/openapi.json", include_in_schema=False, dependencies=[Depends(require("self"))])
    def openapi() -> Any:
        return app.openapi()

    # -- auth ------------------------------------------------------------------------

    @app.post(f"{PREFIX}/auth/login", dependencies=[Depends(credentials)], tags=["auth"])
    def login(body: LoginIn, request: Request) -> Any:
        return _tokens(auth.login(body.name, body.password, totp=body.totp, remote=_remote(request)))

    @app.post(f"{PREFIX}/auth/refresh", dependencies=[Depends(credentials)], tags=["auth"])
    def refresh(body: RefreshIn, request: Request) -> Any:
        return _tokens(auth.refresh(body.refresh_token, remote=_remote(request)))

    @app.post(f"{PREFIX}/auth/logout", status_code=204, tags=["auth"])
    def logout(request: Request, body: LogoutIn | None = None, p: Any = Depends(require("self"))) -> Response:
        bearer = request.state.bearer
        refresh_token = body.refresh_token if body else None
        if bearer.startswith(_auth.API_KEY_PREFIX):
            if refresh_token is None:   # an API key has no session: revoke it with DELETE /api-keys/{id}
                return Response(status_code=204)
            bearer = None
        auth.logout(access_token=bearer, refresh_token=refresh_token, remote=_remote(request))
        return Response(status_code=204)

    @app.get(f"{PREFIX}/auth/me", tags=["auth"])
    def me(p: Any = Depends(require("self"))) -> Any:
        return {"name": p.name, "role": _role(p.role), "kind": p.kind, "key_id": p.key_id}

    @app.post(f"{PREFIX}/auth/totp", tags=["auth"])
    def totp_begin(request: Request, p: Any = Depends(require("self"))) -> Any:
        if p.kind != "user":
            raise _auth.Forbidden("TOTP is for users, not API keys")
        secret, uri = auth.totp_begin(p.name, remote=_remote(request))
        return {"secret": secret, "uri": uri}

    @app.post(f"{PREFIX}/auth/totp/confirm", tags=["auth"])
    def totp_confirm(body: TotpConfirmIn, request: Request, p: Any = Depends(require("self"))) -> Any:
        if p.kind != "user":
            raise _auth.Forbidden("TOTP is for users, not API keys")
        return {"recovery_codes": auth.totp_confirm(p.name, body.code, remote=_remote(request))}

    # -- sites -------------------------------------------------------------------------

    def _who(request: Request) -> dict[str, Any]:
        return {"actor": request.state.principal.actor, "remote": _remote(request)}

    @app.get(f"{PREFIX}/sites", dependencies=[Depends(require("sites.read"))], tags=["sites"])
    def list_sites() -> Any:
        return {"items": [r.data for r in service.list_sites()]}

    @app.post(f"{PREFIX}/sites", status_code=201, dependencies=[Depends(require("sites.write"))], tags=["sites"])
    def create_site(body: SiteIn, request: Request) -> Any:
        r = service.create_site(body.model_dump(exclude_unset=True), **_who(request))
        return _resource(r, 201, f"{PREFIX}/sites/{r.data['name']}")

    @app.get(f"{PREFIX}/sites/{{name}}", dependencies=[Depends(require("sites.read"))], tags=["sites"])
    def get_site(name: str) -> Any:
        return _resource(service.get_site(name))

    @app.put(f"{PREFIX}/sites/{{name}}", dependencies=[Depends(require("sites.write"))], tags=["sites"])
    def replace_site(name: str, body: SiteIn, request: Request,
                     if_match: str | None = Header(None, alias="If-Match")) -> Any:
        return _resource(service.replace_site(name, body.model_dump(exclude_unset=True), if_match=if_match,
                                              **_who(request)))

    @app.delete(f"{PREFIX}/sites/{{name}}", status_code=204, dependencies=[Depends(require("sites.write"))],
                tags=["sites"])
    def delete_site(name: str, request: Request, if_match: str | None = Header(None, alias="If-Match")) -> Response:
        service.delete_site(name, if_match=if_match, **_who(request))
        return Response(status_code=204)

    # -- policies ------------------------------------------------------------------------

    @app.get(f"{PREFIX}/policies", dependencies=[Depends(require("policies.read"))], tags=["policies"])
    def list_policies() -> Any:
        return {"items": [r.data for r in service.list_policies()]}

    @app.post(f"{PREFIX}/policies", status_code=201, dependencies=[Depends(require("policies.write"))],
              tags=["policies"])
    def create_policy(body: PolicyIn, request: Request) -> Any:
        r = service.create_policy(body.model_dump(exclude_unset=True), **_who(request))
        return _resource(r, 201, f"{PREFIX}/policies/{r.data['name']}")

    @app.get(f"{PREFIX}/policies/{{name}}", dependencies=[Depends(require("policies.read"))], tags=["policies"])
    def get_policy(name: str) -> Any:
        return _resource(service.get_policy(name))

    @app.put(f"{PREFIX}/policies/{{name}}", dependencies=[Depends(require("policies.write"))], tags=["policies"])
    def replace_policy(name: str, body: PolicyIn, request: Request,
                       if_match: str | None = Header(None, alias="If-Match")) -> Any:
        return _resource(service.replace_policy(name, body.model_dump(exclude_unset=True), if_match=if_match,
                                                **_who(request)))

    @app.delete(f"{PREFIX}/policies/{{name}}", status_code=204, dependencies=[Depends(require("policies.write"))],
                tags=["policies"])
    def delete_policy(name: str, request: Request,
                      if_match: str | None = Header(None, alias="If-Match")) -> Response:
        service.delete_policy(name, if_match=if_match, **_who(request))
        return Response(status_code=204)

    # -- failover settings -----------------------------------------------------------------

    @app.get(f"{PREFIX}/failover", dependencies=[Depends(require("policies.read"))], tags=["failover"])
    def get_failover() -> Any:
        return _resource(service.get_failover())

    @app.put(f"{PREFIX}/failover", dependencies=[Depends(require("policies.write"))], tags=["failover"])
    def replace_failover(body: FailoverIn, request: Request,
                         if_match: str | None = Header(None, alias="If-Match")) -> Any:
        return _resource(service.replace_failover(body.model_dump(), if_match=if_match, **_who(request)))

    # -- read-only views ---------------------------------------------------------------------

    @app.get(f"{PREFIX}/paths", dependencies=[Depends(require("paths.read"))], tags=["paths"])
    def paths() -> Any:
        return {"items": service.paths()}

    @app.get(f"{PREFIX}/paths/{{path_id}}/metrics", dependencies=[Depends(require("paths.read"))], tags=["paths"])
    def path_metrics(path_id: str, start: str | None = Query(None, description=_TIME),
                     end: str | None = Query(None, description=_TIME), limit: int = Query(1000, ge=1, le=10_000),
                     cursor: str | None = Query(None, max_length=512)) -> Any:
        return service.path_metrics(path_id, start=start, end=end, limit=limit, cursor=cursor)

    @app.get(f"{PREFIX}/flows", dependencies=[Depends(require("flows.read"))], tags=["flows"])
    def flows(site: str | None = None, policy: str | None = None,
              start: str | None = Query(None, description=_TIME), end: str | None = Query(None, description=_TIME),
              limit: int = Query(100, ge=1, le=1000),
              cursor: str | None = Query(None, max_length=512, description="next_cursor of the previous page")) -> Any:
        return service.flows(site=site, policy=policy, start=start, end=end, limit=limit, cursor=cursor).to_dict()

    @app.get(f"{PREFIX}/topology", dependencies=[Depends(require("topology.read"))], tags=["topology"])
    def topology() -> Any:
        return service.topology()

    @app.get(f"{PREFIX}/events", dependencies=[Depends(require("events.read"))], tags=["events"])
    def events(limit: int = Query(100, ge=1, le=10_000), start: str | None = Query(None, description=_TIME),
               end: str | None = Query(None, description=_TIME)) -> Any:
        return {"items": service.events(limit, start=start, end=end)}

    # -- users and API keys ---------------------------------------------------------------------

    @app.get(f"{PREFIX}/users", dependencies=[Depends(require("users.read"))], tags=["users"])
    def list_users() -> Any:
        return {"items": auth.list_users()}

    @app.post(f"{PREFIX}/users", status_code=201, dependencies=[Depends(require("users.write"))], tags=["users"])
    def create_user(body: UserIn, request: Request) -> Any:
        who = _who(request)
        out = auth.create_user(body.name, body.password, _auth.Role(body.role), actor=who["actor"],
                               remote=who["remote"])
        return out if isinstance(out, dict) else {"name": body.name, "role": body.role}

    @app.patch(f"{PREFIX}/users/{{name}}", dependencies=[Depends(require("users.write"))], tags=["users"])
    def update_user(name: str, body: UserPatchIn, request: Request) -> Any:
        who = _who(request)
        return auth.update_user(name, role=body.role, disabled=body.disabled, password=body.password,
                                actor=who["actor"], remote=who["remote"])

    @app.delete(f"{PREFIX}/users/{{name}}", status_code=204, dependencies=[Depends(require("users.write"))],
                tags=["users"])
    def delete_user(name: str, request: Request) -> Response:
        who = _who(request)
        auth.delete_user(name, actor=who["actor"], remote=who["remote"])
        return Response(status_code=204)

    @app.get(f"{PREFIX}/api-keys", dependencies=[Depends(require("apikeys.read"))], tags=["api-keys"])
    def list_api_keys() -> Any:
        return {"items": auth.list_api_keys()}

    @app.post(f"{PREFIX}/api-keys", status_code=201, dependencies=[Depends(require("apikeys.write"))],
              tags=["api-keys"])
    def create_api_key(body: ApiKeyIn, request: Request) -> Any:
        who = _who(request)
        secret, meta = auth.create_api_key(body.name, _auth.Role(body.role), expires_s=body.expires_s,
                                           actor=who["actor"], remote=who["remote"])
        return {**meta, "secret": secret}

    @app.delete(f"{PREFIX}/api-keys/{{key_id}}", status_code=204, dependencies=[Depends(require("apikeys.write"))],
                tags=["api-keys"])
    def revoke_api_key(key_id: str, request: Request) -> Response:
        who = _who(request)
        auth.revoke_api_key(key_id, actor=who["actor"], remote=who["remote"])
        return Response(status_code=204)

    # -- audit ------------------------------------------------------------------------------------

    @app.get(f"{PREFIX}/audit", dependencies=[Depends(require("audit.read"))], tags=["audit"])
    def audit(limit: int = Query(100, ge=1, le=1000), before_id: int | None = Query(None)) -> Any:
        return {"items": db.audit_log(limit=limit, before_id=before_id)}

    # -- Prometheus metrics: GET /metrics, and the request middleware (outermost: a 413 counts too) -----

    app.add_middleware(_BodyLimit, limit=MAX_BODY)
    if getattr(db, "kind", "sqlite") == "etcd":
        app.add_middleware(_StaleReads)
    m = _metrics.install(app, service, dependencies=[Depends(require(_metrics.ACTION))])
    if leader is not None:
        m.leader_from(leader)

    app.state.agents = _agents.build_router(service, auth)
    app.include_router(app.state.agents)
    if graphql:
        from .gql import build_router as _graphql_router

        app.state.graphql = _graphql_router(service, auth, app.state.agents.agent_store,
                                            introspection=graphql_introspection)
        app.include_router(app.state.graphql)

    # -- every route declares who may call it --------------------------------------------------------

    for route in _api_routes(app.routes):
        actions = {getattr(d.call, "_patronus_action", None) for d in route.dependant.dependencies} - {None}
        if len(actions) != 1:
            raise RuntimeError(f"route {sorted(route.methods)} {route.path} declares {len(actions)} actions "
                               "(exactly one of require(...), public, credentials)")
        (action,) = actions
        for method in route.methods:
            ROUTE_ACTIONS[(method, route.path)] = action

    from . import webui as _webui   # the dashboard: GET / and /ui/* (static, public, no data)

    _webui.install(app)
    return app
