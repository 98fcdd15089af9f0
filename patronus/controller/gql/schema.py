"""The GraphQL types, ``Query`` and ``Mutation``, on the controller's service layer.

Every field calls what REST calls (:class:`~patronus.controller.service.Service`,
:class:`~patronus.controller.auth.Auth`, the agent store) in a worker thread,
never on the event loop, and checks the same RBAC action as the REST route
(``auth.PERMISSIONS``): a viewer asking for ``users`` gets an error naming
``users.read``, not data, and the rest of the query still answers.

Errors carry ``extensions``: ``code`` (``FORBIDDEN``, ``UNAUTHENTICATED``,
``BAD_USER_INPUT``, ``NOT_FOUND``, ``CONFLICT``, ``PRECONDITION_FAILED``,
``BAD_CURSOR``, ``LIMIT_EXCEEDED``, ...), ``status`` (the HTTP status REST
would answer), ``field`` (the field a model error names) and, for
``FORBIDDEN``, ``permission``. Names are camelCase (``rttMs``), values are
REST's. The fields only some roles may read (``users``, ``apiKeys``,
``auditLog``, ``tokens``) are nullable: a viewer's query that asks for them
gets its other data, these null, and an error each. Mutations return the resource with its ``etag``; the ``ifMatch``
argument is REST's ``If-Match``.

The hot reads (topology, latest metrics) go through :mod:`.cache`; the
lists of sites, paths and their metrics through the request's loaders
(:mod:`.loaders`); every document through :mod:`.limits` first.
"""

from __future__ import annotations

import base64

import enum
import logging
from collections.abc import Callable
from typing import Any, NewType

import strawberry
from graphql import FloatValueNode, GraphQLError, IntValueNode, StringValueNode
from starlette.concurrency import run_in_threadpool
from strawberry.extensions import MaxTokensLimiter
from strawberry.schema.config import StrawberryConfig
from strawberry.scalars import JSON
from strawberry.types import Info

from ...errors import ConfigError, StateError
from ...model import Failover as FailoverModel
from .. import auth as _auth
from ..problems import ServiceError
from ..service import Resource
from .cache import Cache
from .context import Context, require
from .limits import MAX_PAGE, MAX_TOKENS, Limits, check_page
from .loaders import loaders_of
from .subscriptions import Subscription

__all__ = ["make_schema", "Query", "Mutation", "error_extensions"]

log = logging.getLogger("patronus.controller.graphql")

# -- scalars -------------------------------------------------------------------------------------


def _time_value(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError("a time is epoch seconds (a number) or an RFC 3339 string")
    return v


def _time_literal(node: Any, variables: Any = None) -> Any:
    if isinstance(node, IntValueNode):
        return int(node.value)
    if isinstance(node, FloatValueNode):
        return float(node.value)
    if isinstance(node, StringValueNode):
        return node.value
    raise ValueError("a time is epoch seconds (a number) or an RFC 3339 string")


Time = NewType("Time", object)
BigInt = NewType("BigInt", int)
SCALARS = {
    Time: strawberry.scalar(name="Time", serialize=lambda v: v, parse_value=_time_value, parse_literal=_time_literal,
                            description="seconds since the epoch (a number) or RFC 3339 (\"2024-05-01T12:00:00Z\")"),
    BigInt: strawberry.scalar(name="BigInt", serialize=int, parse_value=int,
                              description="an integer beyond 32 bits (byte counts, nanoseconds)"),
}


# -- helpers ---------------------------------------------------------------------------------------


def need(info: Info[Context, None], action: str) -> Any:
    """``require`` with the action kept on the Forbidden (its error names the permission)."""
    try:
        return require(info.context, action)
    except _auth.Forbidden as e:
        e.action = action  # type: ignore[attr-defined]
        raise


async def call(info: Info[Context, None], fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """Run a blocking service call in a worker thread; one store round trip on the request's count."""
    info.context.store_queries += 1
    return await run_in_threadpool(fn, *args, **kw)


def _who(info: Info[Context, None]) -> dict[str, Any]:
    return {"actor": info.context.actor, "remote": info.context.remote}


def _changed(info: Info[Context, None]) -> None:
    """After a write: the next field of this request reads afresh (no stale mesh from the loaders)."""
    info.context.loaders = None


def _plain(obj: Any) -> Any:
    """A strawberry input as REST's body: a dict of the fields given (UNSET dropped)."""
    if isinstance(obj, list):
        return [_plain(x) for x in obj]
    fields = getattr(obj, "__dataclass_fields__", None)
    if fields is None:
        return obj
    return {k: _plain(getattr(obj, k)) for k in fields if getattr(obj, k) is not strawberry.UNSET}


# -- types: sites, paths, metrics ------------------------------------------------------------------


@strawberry.type
class Me:
    name: str
    role: str
    kind: str


@strawberry.type
class Uplink:
    name: str
    address: str
    mtu: int
    port: int | None
    nat: bool
    bandwidth_mbps: float | None
    cost: int


@strawberry.type(description="one measurement of a path, as an agent stored it")
class Metric:
    ts: float
    rtt_ms: float | None
    jitter_ms: float | None
    loss_pct: float | None
    mos: float | None
    mtu: int | None
    bandwidth_mbps: float | None


@strawberry.type(description="a path's state from the latest failover event about the path itself")
class PathStatus:
    status: str = strawberry.field(description="up, down or damped")
    reason: str
    since: float
    detail: str | None


@strawberry.type
class MetricPage:
    path: str
    in_mesh: bool
    items: list[Metric]
    next_cursor: str | None = strawberry.field(description="pass as `after` for the next page; null on the last")


def _metric(d: dict[str, Any] | None) -> Metric | None:
    if d is None:
        return None
    return Metric(ts=d["ts"], rtt_ms=d["rtt_ms"], jitter_ms=d["jitter_ms"], loss_pct=d["loss_pct"], mos=d["mos"],
                  mtu=d["mtu"], bandwidth_mbps=d["bandwidth_mbps"])


@strawberry.type
class Path:
    id: str
    index: int
    sites: list[str] = strawberry.field(description="the two sites: local, remote")
    uplinks: list[str] = strawberry.field(description="their uplinks, in the same order")

    @classmethod
    def of(cls, p: Any) -> Path:
        return cls(id=p.id, index=p.index, sites=[p.local_site, p.remote_site],
                   uplinks=[p.local_uplink, p.remote_uplink])

    @strawberry.field(description="the latest measurement (null while none was stored)")
    async def latest(self, info: Info[Context, None]) -> Metric | None:
        need(info, "paths.read")
        return _metric(await loaders_of(info.context).latest.load(self.id))

    @strawberry.field(description="up, down or damped, from the failover events (null while none)")
    async def state(self, info: Info[Context, None]) -> PathStatus | None:
        need(info, "paths.read")
        d = await loaders_of(info.context).state.load(self.id)
        return None if d is None else PathStatus(status=d["status"], reason=d["reason"], since=d["since"],
                                                 detail=d["detail"])

    @strawberry.field(description="measurements with start <= ts < end, oldest first, a page of `first`")
    async def history(self, info: Info[Context, None], start: Time | None = None, end: Time | None = None,
                      first: int = 100, after: str | None = None) -> MetricPage:
        need(info, "paths.read")
        check_page(first)
        d = await call(info, info.context.service.path_metrics, self.id, start=start, end=end, limit=first,
                       cursor=after)
        return MetricPage(path=d["path"], in_mesh=d["in_mesh"], items=[_metric(x) for x in d["items"]],
                          next_cursor=d["next_cursor"])


@strawberry.type
class Site:
    name: str
    subnets: list[str]
    uplinks: list[Uplink]
    etag: str = strawberry.field(description="the version, for ifMatch")

    @classmethod
    def of(cls, r: Resource) -> Site:
        d = r.data
        return cls(name=d["name"], subnets=list(d["subnets"]), etag=r.etag,
                   uplinks=[Uplink(name=u["name"], address=u["address"], mtu=u["mtu"], port=u["port"], nat=u["nat"],
                                   bandwidth_mbps=u["bandwidth_mbps"], cost=u["cost"]) for u in d["uplinks"]])

    @strawberry.field(description="Active, Degraded, Inactive or Revoked (its best agent), Pending without an agent")
    async def status(self, info: Info[Context, None]) -> str:
        need(info, "sites.read")
        return (await loaders_of(info.context).site_status()).get(self.name, "Pending")

    @strawberry.field(description="the paths touching this site")
    async def paths(self, info: Info[Context, None]) -> list[Path]:
        need(info, "paths.read")
        return [Path.of(p) for p in await loaders_of(info.context).paths_of(self.name)]


# -- policies and failover ---------------------------------------------------------------------------


@strawberry.type
class Match:
    src: str | None
    dst: str | None
    src_ports: str | None
    dst_ports: str | None
    proto: JSON | None = strawberry.field(description="a protocol number, or a list of them")
    dscp: int | None


@strawberry.type
class QoS:
    dscp: int | None
    rate_kbps: int | None
    duplicate: bool


@strawberry.type
class Policy:
    name: str
    match: Match
    priority: int
    app: str
    qos: QoS | None
    prefer: list[str]
    action: str
    etag: str

    @classmethod
    def of(cls, r: Resource) -> Policy:
        d, m, q = r.data, r.data["match"], r.data.get("qos")
        return cls(name=d["name"], priority=d["priority"], app=d["app"], prefer=list(d["prefer"]),
                   action=d["action"], etag=r.etag,
                   match=Match(src=m["src"], dst=m["dst"], src_ports=m["src_ports"], dst_ports=m["dst_ports"],
                               proto=m["proto"], dscp=m["dscp"]),
                   qos=None if q is None else QoS(dscp=q["dscp"], rate_kbps=q["rate_kbps"],
                                                  duplicate=bool(q.get("duplicate", False))))


_FAILOVER = ("detect_ms", "multiplier", "failback_hold_s", "sla_windows", "cooldown_s", "damp_penalty",
             "damp_half_life_s", "damp_reuse", "damp_suppress")


@strawberry.type
class Failover:
    detect_ms: int
    multiplier: int
    failback_hold_s: float
    sla_windows: int
    cooldown_s: float
    damp_penalty: float
    damp_half_life_s: float
    damp_reuse: float
    damp_suppress: float
    etag: str

    @classmethod
    def of(cls, r: Resource) -> Failover:
        return cls(etag=r.etag, **{k: r.data[k] for k in _FAILOVER})


# -- flows, events, topology --------------------------------------------------------------------------


@strawberry.type
class Flow:
    ts: float
    site: str | None
    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    packets: BigInt
    bytes: BigInt
    first_ns: BigInt
    last_ns: BigInt
    policy: str | None
    path: int | None
    tcp_flags: int


@strawberry.type
class FlowPage:
    items: list[Flow]
    next_cursor: str | None = strawberry.field(description="pass as `after` for the next page; null on the last")


@strawberry.type(description="a failover event an agent reported")
class Event:
    id: int
    ts: float
    policy: str | None
    site: str | None
    from_path: str | None
    to_path: str | None
    reason: str
    detail: str | None


@strawberry.type
class TopologyNode:
    id: str
    subnets: list[str]
    uplinks: list[str]


@strawberry.type
class TopologyEdge:
    id: str
    index: int
    source: str
    target: str
    source_uplink: str
    target_uplink: str


@strawberry.type
class TopologyEdgePage:
    items: list[TopologyEdge]
    next_cursor: str | None = strawberry.field(description="pass as `after` for the next page; null on the last")


def _edge_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"edges:{offset}".encode()).decode()


def _edge_offset(after: str | None, total: int) -> int:
    if after is None:
        return 0
    try:
        kind, _, n = base64.urlsafe_b64decode(after.encode()).decode().partition(":")
        offset = int(n)
    except (ValueError, UnicodeDecodeError):
        offset = -1
        kind = ""
    if kind != "edges" or not 0 <= offset <= total:
        raise GraphQLError("after: not a cursor of these edges (take next_cursor of the previous page)",
                           extensions={"code": "BAD_USER_INPUT", "field": "after"})
    return offset


@strawberry.type
class Topology:
    """Sites as nodes; paths as edges, a page at a time (a 1,000-site full
    mesh has 499,500 of them: the nodes, the count and a first page make a
    map, the rest on demand)."""

    mesh: str
    nodes: list[TopologyNode]
    edge_count: int
    _paths: strawberry.Private[Any]

    @strawberry.field(description="the paths, in index order, `first` at a time")
    def edges(self, first: int = 1000, after: str | None = None) -> TopologyEdgePage:
        check_page(first)
        paths = self._paths()
        start = _edge_offset(after, len(paths))
        chunk = paths[start:start + first]
        end = start + len(chunk)
        return TopologyEdgePage(items=[TopologyEdge(id=p.id, index=p.index, source=p.local_site, target=p.remote_site,
                                                    source_uplink=p.local_uplink, target_uplink=p.remote_uplink)
                                       for p in chunk],
                                next_cursor=_edge_cursor(end) if end < len(paths) else None)


def _topology(ctx: Context) -> Topology:
    """The topology, from the cache while the mesh is the one it was made of;
    the path list is enumerated once per mesh, when a page of edges is asked for."""
    svc, cache = ctx.service, ctx.cache
    ctx.store_queries += 1
    mesh = svc.mesh()
    if cache is not None:
        cache.bind(svc)
        hit, value = cache.get("topology", id(mesh))
        if hit and value[0] is mesh:
            return value[1]
        gen = cache.generation("topology", id(mesh))
    held: list[Any] = []

    def paths() -> list[Any]:
        if not held:
            held.append(mesh.paths())
        return held[0]

    sites = mesh.sites
    ups = [len(x.uplinks) for x in sites]
    count, before = 0, 0
    for k in ups:   # Mesh.paths: each site's uplinks with every earlier site's
        count += k * before
        before += k
    topo = Topology(mesh=mesh.name, nodes=[TopologyNode(id=x.name, subnets=list(x.subnets),
                                                        uplinks=[u.name for u in x.uplinks]) for x in sites],
                    edge_count=count, _paths=paths)
    if cache is not None:
        cache.put("topology", id(mesh), (mesh, topo), gen)
    return topo


# -- users, keys, tokens, agents, audit ----------------------------------------------------------------


@strawberry.enum(name="Role")
class RoleName(enum.Enum):
    admin = "admin"
    operator = "operator"
    viewer = "viewer"


@strawberry.type
class User:
    name: str
    role: str
    created: float
    disabled: bool
    totp_enabled: bool


def _user(d: dict[str, Any]) -> User:
    return User(name=d["name"], role=d["role"], created=d["created"], disabled=d["disabled"],
                totp_enabled=d["totp_enabled"])


@strawberry.type(description="an API key's metadata (never its secret or hash)")
class ApiKey:
    id: str
    name: str
    prefix: str
    role: str
    created_by: str
    created: float
    expires: float | None
    last_used: float | None
    revoked: bool


def _key(d: dict[str, Any]) -> ApiKey:
    return ApiKey(**{k: d[k] for k in ("id", "name", "prefix", "role", "created_by", "created", "expires",
                                       "last_used", "revoked")})


@strawberry.type
class NewApiKey:
    key: ApiKey
    secret: str = strawberry.field(description="the bearer string: shown once")


@strawberry.type(description="an enrolment token's metadata")
class Token:
    id: str
    site: str
    created_by: str
    created: float
    expires: float
    used: float | None
    used_by: str | None
    revoked: bool


def _token(d: dict[str, Any]) -> Token:
    return Token(**{k: d[k] for k in ("id", "site", "created_by", "created", "expires", "used", "used_by",
                                      "revoked")})


@strawberry.type
class NewToken:
    meta: Token
    token: str = strawberry.field(description="the enrolment token for the agent: shown once")


@strawberry.type
class Agent:
    id: str
    site: str
    hostname: str | None
    public_key: str | None
    enrolled: float
    last_seen: float | None
    remote: str | None
    interval_s: float
    revoked: bool
    status: str


@strawberry.type
class AuditEntry:
    id: int
    ts: float
    actor: str
    action: str
    target: str
    before: JSON | None
    after: JSON | None
    remote: str | None
    ok: bool


# -- Query --------------------------------------------------------------------------------------------


@strawberry.type
class Query:
    @strawberry.field(description="who is asking")
    def me(self, info: Info[Context, None]) -> Me:
        p = need(info, "self")
        return Me(name=p.name, role=getattr(p.role, "value", str(p.role)), kind=p.kind)

    @strawberry.field(description="every site of the mesh (sites.read)")
    async def sites(self, info: Info[Context, None]) -> list[Site]:
        need(info, "sites.read")
        mesh = await loaders_of(info.context).mesh()
        return [Site.of(Resource.of(s)) for s in mesh.sites]

    @strawberry.field(description="one site (sites.read); NOT_FOUND when none")
    async def site(self, info: Info[Context, None], name: str) -> Site | None:
        need(info, "sites.read")
        return Site.of(await call(info, info.context.service.get_site, name))

    @strawberry.field(description="every path of the full mesh (paths.read)")
    async def paths(self, info: Info[Context, None]) -> list[Path]:
        need(info, "paths.read")
        mesh = await loaders_of(info.context).mesh()
        return [Path.of(p) for p in mesh.paths()]

    @strawberry.field(description="one path by id (paths.read); null when the mesh has none")
    async def path(self, info: Info[Context, None], id: str) -> Path | None:
        need(info, "paths.read")
        mesh = await loaders_of(info.context).mesh()
        return next((Path.of(p) for p in mesh.paths() if p.id == id), None)

    @strawberry.field(description="every policy (policies.read)")
    async def policies(self, info: Info[Context, None]) -> list[Policy]:
        need(info, "policies.read")
        return [Policy.of(r) for r in await call(info, info.context.service.list_policies)]

    @strawberry.field(description="one policy (policies.read); NOT_FOUND when none")
    async def policy(self, info: Info[Context, None], name: str) -> Policy | None:
        need(info, "policies.read")
        return Policy.of(await call(info, info.context.service.get_policy, name))

    @strawberry.field(description="the failover settings (policies.read)")
    async def failover(self, info: Info[Context, None]) -> Failover:
        need(info, "policies.read")
        return Failover.of(await call(info, info.context.service.get_failover))

    @strawberry.field(description="flow records, of a site and a policy when given, start <= ts < end, "
                                  f"`first` a page (at most {MAX_PAGE}), `after` the previous page's nextCursor "
                                  "(flows.read)")
    async def flows(self, info: Info[Context, None], site: str | None = None, policy: str | None = None,
                    start: Time | None = None, end: Time | None = None, first: int = 100,
                    after: str | None = None) -> FlowPage:
        need(info, "flows.read")
        check_page(first)
        page = await call(info, info.context.service.flows, site=site, policy=policy, start=start, end=end,
                          limit=first, cursor=after)
        return FlowPage(items=[Flow(**r) for r in page.items], next_cursor=page.next_cursor)

    @strawberry.field(description="the latest `first` failover events with start <= ts < end, oldest first "
                                  "(events.read)")
    async def events(self, info: Info[Context, None], start: Time | None = None, end: Time | None = None,
                     first: int = 100) -> list[Event]:
        need(info, "events.read")
        check_page(first)
        rows = await call(info, info.context.service.events, first, start=start, end=end)
        return [Event(**r) for r in rows]

    @strawberry.field(description="sites as nodes, paths as edges (topology.read; cached)")
    async def topology(self, info: Info[Context, None]) -> Topology:
        need(info, "topology.read")
        return await run_in_threadpool(_topology, info.context)

    @strawberry.field(description="every user (users.read: admin)")
    async def users(self, info: Info[Context, None]) -> list[User] | None:
        need(info, "users.read")
        return [_user(u) for u in await call(info, info.context.auth.list_users)]

    @strawberry.field(description="API keys' metadata, newest first (apikeys.read: admin)")
    async def api_keys(self, info: Info[Context, None]) -> list[ApiKey] | None:
        need(info, "apikeys.read")
        return [_key(k) for k in await call(info, info.context.auth.list_api_keys)]

    @strawberry.field(description="the audit log, newest first: `first` rows with ids below `before` "
                                  "(audit.read: admin)")
    async def audit_log(self, info: Info[Context, None], first: int = 100, before: int | None = None) -> list[AuditEntry] | None:
        need(info, "audit.read")
        check_page(first)
        rows = await call(info, info.context.service.db.audit_log, limit=first, before_id=before)
        return [AuditEntry(**r) for r in rows]

    @strawberry.field(description="enrolment tokens' metadata (tokens.read: operator, admin)")
    async def tokens(self, info: Info[Context, None]) -> list[Token] | None:
        need(info, "tokens.read")
        return [_token(t) for t in await call(info, info.context.agents.list_tokens)]

    @strawberry.field(description="site agents and their status (sites.read)")
    async def agents(self, info: Info[Context, None]) -> list[Agent]:
        need(info, "sites.read")
        return [Agent(**a) for a in await call(info, info.context.agents.agents)]


# -- Mutation inputs ------------------------------------------------------------------------------------


@strawberry.input
class UplinkInput:
    name: str
    address: str
    mtu: int | None = strawberry.UNSET
    port: int | None = strawberry.UNSET
    nat: bool | None = strawberry.UNSET
    bandwidth_mbps: float | None = strawberry.UNSET
    cost: int | None = strawberry.UNSET


@strawberry.input
class SiteInput:
    name: str | None = strawberry.field(default=strawberry.UNSET, description="optional on replaceSite")
    subnets: list[str]
    uplinks: list[UplinkInput]


@strawberry.input
class MatchInput:
    src: str | None = strawberry.UNSET
    dst: str | None = strawberry.UNSET
    src_ports: JSON | None = strawberry.field(default=strawberry.UNSET, description='a port, "80-90", or a list')
    dst_ports: JSON | None = strawberry.field(default=strawberry.UNSET, description='a port, "80-90", or a list')
    proto: JSON | None = strawberry.field(default=strawberry.UNSET, description='"tcp", 17, or a list')
    dscp: int | None = strawberry.UNSET


@strawberry.input
class QoSInput:
    dscp: int | None = strawberry.UNSET
    rate_kbps: int | None = strawberry.UNSET
    duplicate: bool | None = strawberry.UNSET


@strawberry.input
class PolicyInput:
    name: str | None = strawberry.field(default=strawberry.UNSET, description="optional on replacePolicy")
    match: MatchInput
    priority: int
    app: str | None = strawberry.UNSET
    qos: QoSInput | None = strawberry.UNSET
    prefer: list[str] | None = strawberry.UNSET
    action: str | None = strawberry.UNSET


_FO = FailoverModel()   # the model's defaults, once


@strawberry.input(description="omitted fields take their defaults (as REST's PUT /failover)")
class FailoverInput:
    detect_ms: int = _FO.detect_ms
    multiplier: int = _FO.multiplier
    failback_hold_s: float = _FO.failback_hold_s
    sla_windows: int = _FO.sla_windows
    cooldown_s: float = _FO.cooldown_s
    damp_penalty: float = _FO.damp_penalty
    damp_half_life_s: float = _FO.damp_half_life_s
    damp_reuse: float = _FO.damp_reuse
    damp_suppress: float = _FO.damp_suppress


def _body(obj: Any) -> dict[str, Any]:
    """An input as a REST body; an explicit null of a field with a default is dropped (as unset)."""
    d = _plain(obj)
    for k in ("mtu", "nat", "cost", "app", "prefer", "action"):
        if k in d and d[k] is None:
            del d[k]
    if "uplinks" in d:
        d["uplinks"] = [{k: v for k, v in u.items() if not (k in ("mtu", "nat", "cost") and v is None)}
                        for u in d["uplinks"]]
    return d


# -- Mutation --------------------------------------------------------------------------------------------


@strawberry.type
class Mutation:
    @strawberry.mutation(description="add a site (sites.write); CONFLICT when the name is taken")
    async def create_site(self, info: Info[Context, None], input: SiteInput) -> Site:
        need(info, "sites.write")
        r = await call(info, info.context.service.create_site, _body(input), **_who(info))
        _changed(info)
        return Site.of(r)

    @strawberry.mutation(description="replace a site (sites.write); PRECONDITION_FAILED when ifMatch is not "
                                     "its etag")
    async def replace_site(self, info: Info[Context, None], name: str, input: SiteInput,
                           if_match: str | None = None) -> Site:
        need(info, "sites.write")
        r = await call(info, info.context.service.replace_site, name, _body(input), if_match=if_match, **_who(info))
        _changed(info)
        return Site.of(r)

    @strawberry.mutation(description="remove a site (sites.write); CONFLICT while a policy needs it")
    async def delete_site(self, info: Info[Context, None], name: str, if_match: str | None = None) -> bool:
        need(info, "sites.write")
        await call(info, info.context.service.delete_site, name, if_match=if_match, **_who(info))
        _changed(info)
        return True

    @strawberry.mutation(description="add a policy (policies.write); CONFLICT when the name or priority is taken")
    async def create_policy(self, info: Info[Context, None], input: PolicyInput) -> Policy:
        need(info, "policies.write")
        r = await call(info, info.context.service.create_policy, _body(input), **_who(info))
        _changed(info)
        return Policy.of(r)

    @strawberry.mutation(description="replace a policy (policies.write)")
    async def replace_policy(self, info: Info[Context, None], name: str, input: PolicyInput,
                             if_match: str | None = None) -> Policy:
        need(info, "policies.write")
        r = await call(info, info.context.service.replace_policy, name, _body(input), if_match=if_match,
                       **_who(info))
        _changed(info)
        return Policy.of(r)

    @strawberry.mutation(description="remove a policy (policies.write)")
    async def delete_policy(self, info: Info[Context, None], name: str, if_match: str | None = None) -> bool:
        need(info, "policies.write")
        await call(info, info.context.service.delete_policy, name, if_match=if_match, **_who(info))
        _changed(info)
        return True

    @strawberry.mutation(description="replace the failover settings (policies.write)")
    async def set_failover(self, info: Info[Context, None], input: FailoverInput,
                           if_match: str | None = None) -> Failover:
        need(info, "policies.write")
        r = await call(info, info.context.service.replace_failover, _plain(input), if_match=if_match, **_who(info))
        _changed(info)
        return Failover.of(r)

    @strawberry.mutation(description="an enrolment token for a site's agent (tokens.write)")
    async def create_token(self, info: Info[Context, None], site: str, ttl_s: float = 3600.0) -> NewToken:
        need(info, "tokens.write")
        d = await call(info, info.context.agents.create_token, site, ttl_s, **_who(info))
        return NewToken(meta=_token(d), token=d["token"])

    @strawberry.mutation(description="revoke an enrolment token (tokens.write)")
    async def revoke_token(self, info: Info[Context, None], id: str) -> bool:
        need(info, "tokens.write")
        await call(info, info.context.agents.revoke_token, id, **_who(info))
        return True

    @strawberry.mutation(description="revoke an agent's credential (tokens.write)")
    async def revoke_agent(self, info: Info[Context, None], id: str) -> bool:
        need(info, "tokens.write")
        await call(info, info.context.agents.revoke_agent, id, **_who(info))
        _changed(info)
        return True

    @strawberry.mutation(description="a new API key (apikeys.write: admin); its secret is shown once")
    async def create_api_key(self, info: Info[Context, None], name: str, role: RoleName,
                             expires_s: float | None = None) -> NewApiKey:
        need(info, "apikeys.write")
        secret, meta = await call(info, info.context.auth.create_api_key, name, _auth.Role(role.value),
                                  expires_s=expires_s, **_who(info))
        return NewApiKey(key=_key(meta), secret=secret)

    @strawberry.mutation(description="revoke an API key (apikeys.write: admin)")
    async def revoke_api_key(self, info: Info[Context, None], id: str) -> bool:
        need(info, "apikeys.write")
        await call(info, info.context.auth.revoke_api_key, id, **_who(info))
        return True

    @strawberry.mutation(description="add a user (users.write: admin)")
    async def add_user(self, info: Info[Context, None], name: str, password: str, role: RoleName) -> User:
        need(info, "users.write")
        auth = info.context.auth
        await call(info, auth.create_user, name, password, _auth.Role(role.value), **_who(info))
        return _user(await call(info, auth.get_user, name))

    @strawberry.mutation(description="change a user's role, disable or enable them, reset the password "
                                     "(users.write: admin)")
    async def update_user(self, info: Info[Context, None], name: str, role: RoleName | None = None,
                          disabled: bool | None = None, password: str | None = None) -> User:
        need(info, "users.write")
        d = await call(info, info.context.auth.update_user, name, role=None if role is None else role.value,
                       disabled=disabled, password=password, **_who(info))
        return _user(d)

    @strawberry.mutation(description="delete a user (users.write: admin)")
    async def remove_user(self, info: Info[Context, None], name: str) -> bool:
        need(info, "users.write")
        await call(info, info.context.auth.delete_user, name, **_who(info))
        return True


# -- errors ----------------------------------------------------------------------------------------------


def error_extensions(exc: BaseException) -> dict[str, Any] | None:
    """The ``extensions`` of an error a resolver raised (None: not one of ours, an internal error)."""
    if isinstance(exc, _auth.Forbidden):
        out: dict[str, Any] = {"code": "FORBIDDEN", "status": 403}
        action = getattr(exc, "action", None)
        if action:
            out["permission"] = action
        return out
    if isinstance(exc, _auth.RateLimited):
        return {"code": "RATE_LIMITED", "status": 429, "retryAfter": exc.retry_after}
    if isinstance(exc, _auth.AuthError):
        return {"code": "UNAUTHENTICATED", "status": 401}
    if isinstance(exc, _auth.ControllerError):   # auth's NotFound, Conflict
        code = {404: "NOT_FOUND", 409: "CONFLICT"}.get(exc.status, "BAD_REQUEST")
        return {"code": code, "status": exc.status}
    if isinstance(exc, ServiceError):
        code = {404: "NOT_FOUND", 409: "CONFLICT", 412: "PRECONDITION_FAILED", 428: "PRECONDITION_REQUIRED",
                422: "BAD_CURSOR", 503: "UNAVAILABLE"}.get(exc.status, "BAD_REQUEST")
        out = {"code": code, "status": exc.status}
        if exc.field is not None:
            out["field"] = exc.field
        return out
    if isinstance(exc, ConfigError):
        return {"code": "BAD_USER_INPUT", "status": 422, "field": exc.field}
    if isinstance(exc, StateError):
        return {"code": "UNAVAILABLE", "status": 503}
    return None


class _Schema(strawberry.Schema):
    def process_errors(self, errors: list[GraphQLError], execution_context: Any = None) -> None:
        """Give our errors their extensions; log (and hide the text of) anything else a resolver raised."""
        for err in errors:
            orig = err.original_error
            if orig is None or isinstance(orig, GraphQLError):
                continue
            ext = error_extensions(orig)
            if ext is None:
                if err.path is None:   # an input that did not coerce: graphql-core's message says what
                    continue
                log.error("GraphQL resolver %s failed", ".".join(map(str, err.path)), exc_info=orig)
                err.message = "internal server error (logged by the controller)"
                ext = {"code": "INTERNAL_SERVER_ERROR", "status": 500}
            err.extensions = {**(err.extensions or {}), **ext}


def make_schema(*, introspection: bool = True, cache: Cache | None = None,
                limits: dict[str, Any] | None = None) -> tuple[strawberry.Schema, Cache]:
    """The schema and its cache. ``introspection=False`` refuses ``__schema``
    and ``__type``; ``limits`` overrides :class:`~.limits.Limits`' defaults
    (``max_depth``, ``max_aliases``, ``max_tokens``, ``max_complexity``, ``max_page``, ``default_list``)."""
    cache = cache if cache is not None else Cache()
    kw = {"introspection": introspection, **(limits or {})}
    max_tokens = int(kw.get("max_tokens", MAX_TOKENS))
    schema = _Schema(query=Query, mutation=Mutation, subscription=Subscription,
                     config=StrawberryConfig(scalar_map=SCALARS),
                     extensions=[Limits.factory(**kw), lambda: MaxTokensLimiter(max_token_count=max_tokens + 1)])
    return schema, cache
