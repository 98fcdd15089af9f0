"""The `patronus` command."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="patronus", description="SD-WAN toolkit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run the demo")
    d.add_argument("--state", help="state file to write (default: a temporary file)")
    b = sub.add_parser("bfd", help="run one BFD session, print a JSON line per state change")
    b.add_argument("--local", required=True, help="local address")
    b.add_argument("--peer", required=True, help="peer address")
    b.add_argument("--tx-ms", type=float, default=300, help="desired minimum transmit interval (ms)")
    b.add_argument("--rx-ms", type=float, default=300, help="required minimum receive interval (ms)")
    b.add_argument("--multiplier", type=int, default=3, help="detection multiplier")
    b.add_argument("--multihop", action="store_true", help="RFC 5883 multihop (port 4784)")
    b.add_argument("--netns", help="run inside this named network namespace")
    b.add_argument("--duration", type=float, help="stop after this many seconds (default: until SIGINT/SIGTERM)")
    lab = sub.add_parser("lab", help="the network-namespace lab: sites, uplinks, WireGuard tunnels")
    lab.add_argument("action", choices=["up", "status", "down"])
    lab.add_argument("--tag", default="pnlab", help="name of the lab (1-6 letters/digits; default pnlab)")
    lab.add_argument("--sites", type=int, default=3)
    lab.add_argument("--uplinks", type=int, default=2)
    lab.add_argument("--agents", action="store_true",
                     help="up: the network only, then a `patronus agent` per site (its own tunnels, data plane, "
                          "BFD, failover) in the site's namespace; waits until every path's BFD is up")
    lab.add_argument("--backend", default="auto", choices=["auto", "xdp", "userspace"],
                     help="the agents' data plane (with --agents)")
    lab.add_argument("--timeout", type=float, default=120.0,
                     help="seconds to wait for the agents to be ready (with --agents)")
    lab.add_argument("--json", action="store_true", help="status: print JSON instead of tables")
    ag = sub.add_parser("agent", help="run a site: tunnels, data plane, BFD, failover, state")
    ag.add_argument("--state", required=True, help="the SQLite state file (mesh and discovery registry); with "
                                                   "--controller, the controller credential and the cached "
                                                   "desired state are kept next to it (STATE.SITE.controller.json)")
    ag.add_argument("--controller", metavar="URL",
                    help="take the desired state from this controller (https://host:port; controller replicas: "
                         "every address, separated by commas, tried in turn); the first run enrols with the token "
                         "of --token-file (it pins the controller's certificate)")
    ag.add_argument("--site", required=True, help="which site of the mesh this is")
    ag.add_argument("--lan-if", help="LAN interface to attach the data plane and steering to")
    tok = ag.add_mutually_exclusive_group()
    tok.add_argument("--token", help="enrollment token (first run of a site); on the command line it is visible "
                                     "to every local user (/proc/PID/cmdline, ps): prefer --token-file or "
                                     "the PATRONUS_TOKEN environment variable")
    tok.add_argument("--token-file", metavar="PATH", help="read the enrollment token from this file")
    ag.add_argument("--prefix", help="tunnel interface name prefix (unique on the machine)")
    ag.add_argument("--backend", default="auto", choices=["auto", "xdp", "userspace"])
    ag.add_argument("--wireguard", default="userspace", choices=["userspace", "kernel", "auto"],
                    help="the tunnels: wireguard-go (userspace, the default), the kernel's WireGuard, or the "
                         "kernel's where it has WireGuard (auto)")
    ag.add_argument("--metrics-listen", metavar="ADDRESS:PORT",
                    help="serve Prometheus metrics (data plane, paths, BFD, failover) at http://ADDRESS:PORT/metrics; "
                         "off loopback --metrics-token-file is required")
    ag.add_argument("--metrics-token-file", metavar="PATH",
                    help="a 0600 file with the bearer token scrapes must present")
    ag.add_argument("--bfd-ms", type=int, default=50, metavar="MS",
                    help="BFD transmit and receive interval on every path, 10..10000 ms (x 3 is the detection "
                         "time; default 50)")
    ag.add_argument("--ipfix", metavar="HOST:PORT", help="export every flow to this IPFIX collector (UDP)")
    ag.add_argument("--bgp", metavar="FILE",
                    help="peer with the site's LAN routers (a JSON file: asn, neighbors, aggregates, max_prefixes, "
                         "allow_default, networks; docs/BGP.md)")
    ag.add_argument("--flow-idle-timeout", type=float, default=15.0, metavar="S",
                    help="a flow idle this long is exported and forgotten (default 15 s)")
    ag.add_argument("--flow-active-timeout", type=float, default=60.0, metavar="S",
                    help="a flow that lives on is exported this often (default 60 s)")
    ag.add_argument("--log-format", default="text", choices=["text", "json"],
                    help="log lines for people (text) or one JSON object a line with site, path, policy, "
                         "remote_site and reason fields (json)")
    ag.add_argument("--nice", type=int, default=-10, metavar="N",
                    help="scheduling priority of the agent and its tunnels, -20..19 (default -10: BFD at 50 ms x 3 "
                         "must not wait behind bulk work; 0 keeps the default)")
    ag.epilog = ("Without --token or --token-file the token is read from $PATRONUS_TOKEN; "
                 "a site enrolled already needs none.")
    tk = sub.add_parser("token", help="create, list and revoke enrollment tokens")
    tk_sub = tk.add_subparsers(dest="token_cmd", required=True)
    tk_create = tk_sub.add_parser("create", help="make a one-time token for a site; printed once, stored hashed")
    tk_create.add_argument("--state", required=True, help="the SQLite state file (must exist)")
    tk_create.add_argument("--site", required=True, help="the site it enrolls")
    tk_create.add_argument("--ttl-s", type=float, default=3600.0, help="seconds it stays valid (default 3600)")
    tk_revoke = tk_sub.add_parser("revoke", help="delete a site's unused tokens")
    tk_revoke.add_argument("--state", required=True, help="the SQLite state file (must exist)")
    tk_revoke.add_argument("--site", required=True)
    tk_list = tk_sub.add_parser("list", help="every token: site, expiry, when used (never the token)")
    tk_list.add_argument("--state", required=True, help="the SQLite state file (must exist)")
    ct = sub.add_parser("controller", help="the controller: REST API, users, RBAC, over HTTPS")
    ct_sub = ct.add_subparsers(dest="controller_cmd", required=True)
    ct_init = ct_sub.add_parser("init", help="create a state directory: store, signing key, TLS certificate, "
                                             "first admin (its password printed once)")
    ct_init.add_argument("--state", required=True, help="the state directory to create (must not exist, or be empty)")
    ct_run = ct_sub.add_parser("run", help="serve the REST API over HTTPS until SIGTERM")
    for p_ in (ct_init, ct_run):
        p_.add_argument("--store", metavar="URL", help="keep the state in etcd, shared by controller replicas: "
                        "etcd://h1:2379,h2:2379,h3:2379[/prefix] (etcds:// for TLS); default: SQLite in the "
                        "state directory (run: what init chose)")
        p_.add_argument("--etcd-ca", metavar="PEM", help="CA certificate that signed the etcd members' (etcds://)")
        p_.add_argument("--etcd-cert", metavar="PEM", help="client certificate for etcd (with --etcd-key)")
        p_.add_argument("--etcd-key", metavar="PEM", help="client key for etcd")
        p_.add_argument("--etcd-user", help="etcd user (its password from the environment: PATRONUS_ETCD_PASSWORD)")
    ct_run.add_argument("--state", required=True, help="a state directory made by `patronus controller init`")
    ct_run.add_argument("--listen", default="127.0.0.1:8443", help="host:port (default 127.0.0.1:8443; port 0: any)")
    ct_run.add_argument("--log-format", default="text", choices=["text", "json"],
                        help="log lines for people (text) or one JSON object a line (json)")
    ct_run.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    ct_run.add_argument("--no-graphql-introspection", action="store_true",
                        help="refuse GraphQL introspection queries (on by default, for authenticated users only)")
    op = sub.add_parser("operator", help="the Kubernetes operator: Site and Policy resources reconciled through "
                                         "the controller (needs patronus[operator])")
    op.add_argument("--controller", metavar="URL[,URL...]", required=True,
                    help="the controller (https://host:port; replicas: every address, separated by commas, tried "
                         "in turn on connection errors and 503)")
    op.add_argument("--api-key-file", metavar="PATH",
                    help="a file holding the controller API key (role operator); default: $PATRONUS_API_KEY")
    op.add_argument("--ca", metavar="PATH", help="the controller's certificate (pinned: its host name is not "
                                                 "checked) or a CA bundle (default: the system's CAs)")
    op.add_argument("--kubeconfig", metavar="PATH",
                    help="Kubernetes credentials (default: the pod's service account, else $KUBECONFIG or "
                         "~/.kube/config)")
    ns = op.add_mutually_exclusive_group()
    ns.add_argument("--namespace", metavar="NS", action="append",
                    help="watch this namespace (repeatable; default: $POD_NAMESPACE, else default)")
    ns.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    op.add_argument("--metrics-port", type=int, default=8080, metavar="PORT",
                    help="Prometheus metrics at /metrics (default 8080; 0: any free port, logged)")
    op.add_argument("--health-port", type=int, default=8081, metavar="PORT",
                    help="/livez, /readyz, /healthz (default 8081; 0: any free port, logged)")
    op.add_argument("--listen-address", default="0.0.0.0", metavar="ADDRESS",
                    help="address of the metrics and health servers (default 0.0.0.0)")
    op.add_argument("--log-format", default="text", choices=["text", "json"],
                    help="log lines for people (text) or one JSON object a line (json)")
    cg = sub.add_parser("crdgen", help="write the Site and Policy CustomResourceDefinitions, generated from the "
                                       "model")
    cg.add_argument("--out", metavar="DIR", default="deploy/helm/patronus-operator/crds",
                    help="directory to write them to (default deploy/helm/patronus-operator/crds)")
    cg.add_argument("--check", action="store_true",
                    help="write nothing: exit 1 and list the differences when the files in --out are not what "
                         "would be generated")
    fl = sub.add_parser("flows", help="account a capture's flows by policy and export every record (IPFIX, "
                                      "Parquet)")
    fl.add_argument("--pcap", required=True, metavar="FILE", help="a pcap or pcapng capture")
    fl.add_argument("--state", metavar="DB", help="classify by the policies of this state file's mesh (default: "
                                                   "none, every flow in the default class)")
    fl.add_argument("--ipfix", metavar="HOST:PORT", help="send the records to this IPFIX collector (UDP)")
    fl.add_argument("--parquet", metavar="DIR", help="write the records to a Parquet archive, one directory an hour")
    fl.add_argument("--idle-timeout", type=float, default=15.0, metavar="S",
                    help="a flow idle this long ends (capture time; default 15 s)")
    fl.add_argument("--active-timeout", type=float, default=60.0, metavar="S",
                    help="a flow longer than this is exported in several records (default 60 s)")
    fl.add_argument("--capacity", type=int, default=1 << 20, metavar="N",
                    help="flow table size; a full table exports its least recently used flow (default 1,048,576)")
    args = parser.parse_args(argv)
    if args.cmd == "flows":
        return _flows(args)
    if args.cmd == "token":
        return _token(args)
    if args.cmd == "agent":
        from . import agent

        return agent.main(args)
    if args.cmd == "lab":
        return _lab(args)
    if args.cmd == "demo":
        from . import demo

        return demo.run(sys.stdout, args.state)
    if args.cmd == "bfd":
        return _bfd(args)
    if args.cmd == "controller":
        return _controller(args)
    if args.cmd == "operator":
        return _operator(args)
    if args.cmd == "crdgen":
        from .operator import crd

        return crd.main(args)
    return 2


def _operator(args: argparse.Namespace) -> int:
    try:
        from .operator import run
    except ImportError as e:   # kopf, aiohttp or prometheus-client missing
        print(f"patronus operator: {e} (install patronus[operator])", file=sys.stderr)
        return 2
    return run.main(args)


def _flows(args: argparse.Namespace) -> int:
    from .errors import PatronusError
    from .export import export_capture

    try:
        r = export_capture(args.pcap, state=args.state, ipfix=args.ipfix, parquet=args.parquet,
                           idle_timeout_s=args.idle_timeout, active_timeout_s=args.active_timeout,
                           capacity=args.capacity)
    except (PatronusError, OSError) as e:
        print(f"patronus flows: {e}", file=sys.stderr)
        return 2
    cap = r["capture"]
    print(f"{cap.get('packets', 0):,} packets ({r['malformed']:,} malformed): {r['records']:,} flow records, "
          f"{r['packets']:,} packets, {r['bytes']:,} bytes; {r['evicted']:,} flows evicted from a full table "
          "(exported, not lost)")
    if r["ipfix"] is not None:
        i = r["ipfix"]
        print(f"IPFIX to {args.ipfix}: {i['records']:,} records in {i['messages']:,} messages, "
              f"templates sent {i['templates_sent']} times, {i['send_errors']} send errors")
    if r["parquet"] is not None:
        q = r["parquet"]
        print(f"Parquet in {args.parquet}: {q['records']:,} records in {q['files']} files")
    return 0 if not (r["ipfix"] or {}).get("send_errors") else 1


def _controller(args: argparse.Namespace) -> int:
    from .errors import PatronusError

    try:
        from .controller import server
    except ImportError as e:
        print(f"patronus controller: {e} (install patronus[controller])", file=sys.stderr)
        return 2
    try:
        store = None
        if args.store is not None:
            store = server.StoreConfig(args.store, args.etcd_ca, args.etcd_cert, args.etcd_key, args.etcd_user)
        if args.controller_cmd == "init":
            out = server.init(args.state, store)
            print(f"controller state created in {out['state_dir']}")
            print(f"admin user:      {out['admin_user']}")
            if out["admin_password"] is None:
                print("admin password:  (the store has the admin already: another replica was initialised first)")
            else:
                print(f"admin password:  {out['admin_password']}   (shown once: store it now)")
            print(f"TLS certificate: {out['cert']}")
            print(f"cert SHA-256:    {out['cert_sha256']}")
            return 0

        def ready(host: str, port: int) -> None:
            shown = f"[{host}]" if ":" in host else host
            print(f"patronus controller listening on https://{shown}:{port}", flush=True)

        return server.run(args.state, args.listen, log_level=args.log_level, log_format=args.log_format,
                          on_ready=ready, introspection=not args.no_graphql_introspection, store=store)
    except PatronusError as e:
        print(f"patronus controller: {e}", file=sys.stderr)
        return 2


def _token(args: argparse.Namespace) -> int:
    import time

    from .errors import ConfigError, PatronusError
    from .wireguard.discovery import SqliteRegistry

    try:
        reg = SqliteRegistry(args.state, create=False)
    except PatronusError as e:
        print(f"patronus token: {e} (create the state with patronus.save_mesh first)", file=sys.stderr)
        return 2
    try:
        if args.token_cmd == "create":
            sites = reg.mesh_sites()
            if sites is not None and args.site not in sites:
                raise ConfigError("--site", args.site, f"is not a site of the saved mesh (its sites: "
                                                       f"{', '.join(sites) or 'none'})")
            print(reg.create_token(args.site, ttl_s=args.ttl_s), flush=True)
        elif args.token_cmd == "revoke":
            print(f"revoked {reg.revoke_tokens(args.site)} unused token(s) of site {args.site!r}")
        else:
            def when(t: float | None) -> str:
                return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))

            rows = reg.tokens()
            print(f"{'site':<32} {'expires':<19} used")
            now = time.time()
            for r in rows:
                exp = when(r["expires"]) + (" (expired)" if r["used"] is None and r["expires"] < now else "")
                print(f"{r['site']:<32} {exp:<19} {when(r['used'])}")
        return 0
    except PatronusError as e:
        print(f"patronus token: {e}", file=sys.stderr)
        return 2
    finally:
        reg.close()


def _lab(args: argparse.Namespace) -> int:
    import json

    from .errors import PatronusError
    from .lab import net

    path = net.STATE_DIR / f"{args.tag}.json"
    try:
        if args.action == "up" and args.agents:
            return _lab_agents(args, net)
        if args.action == "up":
            lab = net.Lab(args.tag, args.sites, args.uplinks).up()
            for p in lab.mesh.paths():  # a route for every site pair: its first path
                if p.index == lab.mesh.paths(p.local_site, p.remote_site)[0].index:
                    lab.force_path(p.id)
            print(f"lab {args.tag}: {args.sites} sites x {args.uplinks} uplinks, {len(lab.wg)} WireGuard "
                  f"tunnels up; LAN hosts in namespaces {lab.lan_ns(0)} .. {lab.lan_ns(args.sites - 1)} "
                  f"(10.N.0.2); 'patronus lab down --tag {args.tag}' removes it")
            return 0
        if args.action == "status":
            st = net.status(path)
            print(json.dumps(st, indent=2) if args.json else net.status_text(st))
            return 0
        removed = net.cleanup(path)
        print(f"lab {args.tag}: {'removed' if removed else 'nothing to remove'}")
        return 0
    except PatronusError as e:
        print(f"patronus lab: {e}", file=sys.stderr)
        return 2


def _lab_agents(args: argparse.Namespace, net: Any) -> int:
    import time

    t0 = time.monotonic()
    lab = net.Lab(args.tag, args.sites, args.uplinks).up(tunnels=False)
    try:
        lab.start_agents(backend=args.backend)
        statuses = lab.wait_agents(args.timeout)
    except BaseException:  # the agents' last words are in the error; nothing is left behind
        lab.down()
        raise
    backends = sorted({st["backend"] for st in statuses.values()})
    paths = sum(len(st["paths"]) for st in statuses.values())
    print(f"lab {args.tag}: {args.sites} sites x {args.uplinks} uplinks, {len(statuses)} agents ready "
          f"(backend {', '.join(backends)}) in {time.monotonic() - t0:.1f} s, BFD up on {paths} tunnels; "
          f"LAN hosts in namespaces {lab.lan_ns(0)} .. {lab.lan_ns(args.sites - 1)} (10.N.0.2); "
          f"'patronus lab status --tag {args.tag}' shows paths and routes, "
          f"'patronus lab down --tag {args.tag}' removes it")
    return 0


def _bfd(args: argparse.Namespace) -> int:
    import asyncio
    import signal

    from .errors import PatronusError
    from .failover.transport import BfdSession, transition_json

    async def run() -> int:
        try:
            s = BfdSession(local=args.local, peer=args.peer, tx_ms=args.tx_ms, rx_ms=args.rx_ms,
                           multiplier=args.multiplier, multihop=args.multihop, netns=args.netns)
            s.on_change(lambda t: print(transition_json(s, t), flush=True))
            await s.start()
        except PatronusError as e:
            print(f"patronus bfd: {e}", file=sys.stderr)
            return 2
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await asyncio.wait_for(stop.wait(), args.duration)
        except asyncio.TimeoutError:
            pass
        await s.stop()
        return 0

    return asyncio.run(run())


if __name__ == "__main__":
    sys.exit(main())
