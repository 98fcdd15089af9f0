"""LAN-side BGP routers for lab tests: FRR (zebra + bgpd) or BIRD 2 run
inside an existing network namespace and peer over eBGP with whatever
the test puts on the other side (an ExaBGP speaker in a site's edge
namespace, or another router of this module).

Both classes have the same interface::

    r = FrrRouter(ns, workdir, asn=65001, router_id="10.250.1.1",
                  neighbors=[("10.250.1.2", 65002), ("fd00:250:1::2", 65002)])
    r.start()
    try:
        r.wait(lambda: r.session_state("10.250.1.2") == "Established", "session up", 30)
        r.announce("10.1.0.0/24")               # originated towards every neighbor of its family
        r.wait(lambda: "10.2.0.0/24" in r.rib(), "10.2.0.0/24 learned", 30)
        assert r.fib("10.2.0.0/24")              # learned routes go into the namespace's kernel table
    finally:
        r.stop()

A neighbor carries the address family of its address: an IPv4 neighbor
exchanges IPv4 unicast, an IPv6 neighbor IPv6 unicast. ``rib()`` lists the
routes learned from neighbors (not the router's own announcements), by
prefix: ``{"next_hop": str, "communities": ["a:b", "a:b:c"], "as_path":
[int], "best": bool}`` (large communities are the three-part strings).
Timers: hold 9 s, keepalive 3 s, connect retry 1 s.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

FRR = Path("/usr/lib/frr")
T = TypeVar("T")


def frr_available() -> str | None:
    """Why FRR's bgpd cannot run here, or None."""
    if os.geteuid() != 0:
        return "FRR in a namespace needs root"
    if not (FRR / "bgpd").exists() or not (FRR / "zebra").exists() or not shutil.which("vtysh"):
        return "FRR is not installed (apt-get install frr)"
    return None


def bird_available() -> str | None:
    """Why BIRD 2 cannot run here, or None."""
    if os.geteuid() != 0:
        return "BIRD in a namespace needs root"
    if not shutil.which("bird") or not shutil.which("birdc"):
        return "BIRD 2 is not installed (apt-get install bird2)"
    return None


def addr_family(prefix_or_addr: str) -> str:
    """"ipv4" or "ipv6"."""
    return "ipv6" if ":" in prefix_or_addr else "ipv4"


def _run(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def _alive(pid: int, name: str) -> bool:
    """Whether process ``pid`` still runs ``name`` (a zombie counts as gone:
    daemons are reparented to PID 1, which may never reap them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    comm, rest = stat.split("(", 1)[1].rsplit(")", 1)
    return rest.split()[0] not in ("Z", "X") and name.startswith(comm[:15])


def _stop_pidfile(pidfile: Path, name: str, timeout: float = 10.0) -> None:
    """SIGTERM the daemon in ``pidfile``, wait for it to exit, SIGKILL it
    if it does not; the pidfile is removed. No pidfile: nothing to do."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if _alive(pid, name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + timeout
        while _alive(pid, name) and time.monotonic() < end:
            time.sleep(0.05)
        if _alive(pid, name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            end = time.monotonic() + 5
            while _alive(pid, name) and time.monotonic() < end:
                time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        pidfile.unlink()


class _Router:
    """What FRR and BIRD share: neighbors, the announced prefixes, waiting
    and the kernel-table check."""

    def __init__(self, ns: str, workdir: Path, *, asn: int, router_id: str,
                 neighbors: Iterable[tuple[str, int]]) -> None:
        self.ns, self.dir = ns, Path(workdir)
        self.asn, self.router_id = asn, router_id
        self.neighbors = [(str(ipaddress.ip_address(a)), int(n)) for a, n in neighbors]
        self.announced: dict[str, list[str]] = {"ipv4": [], "ipv6": []}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ns={self.ns!r}, asn={self.asn})"

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def rib(self, family: str = "ipv4") -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def session_state(self, neighbor: str) -> str:
        raise NotImplementedError

    def fib(self, prefix: str) -> bool:
        """Whether ``prefix`` is in the namespace's kernel main table."""
        p = _run(["ip", "-n", self.ns, "-6" if addr_family(prefix) == "ipv6" else "-4", "-j",
                  "route", "show", prefix])
        if p.returncode != 0:
            raise RuntimeError(f"ip route show {prefix} in {self.ns}: {p.stderr.strip()}")
        return bool(json.loads(p.stdout or "[]"))

    def describe(self) -> str:
        """The current sessions and rib, for failure messages."""
        parts = []
        for addr, _ in self.neighbors:
            try:
                parts.append(f"{addr}: {self.session_state(addr)}")
            except Exception as e:  # noqa: BLE001 - a diagnostic must not raise
                parts.append(f"{addr}: ? ({e})")
        for fam in ("ipv4", "ipv6"):
            try:
                parts.append(f"rib {fam}: {self.rib(fam)}")
            except Exception as e:  # noqa: BLE001
                parts.append(f"rib {fam}: ? ({e})")
        return "; ".join(parts)

    def wait(self, cond: Callable[[], T], what: str, timeout: float = 30.0, interval: float = 0.2) -> T:
        """Poll ``cond`` until it returns something true, and return that;
        after ``timeout`` seconds an AssertionError naming ``what`` and the
        router's sessions and rib."""
        end = time.monotonic() + timeout
        while True:
            got = cond()
            if got:
                return got
            if time.monotonic() >= end:
                raise AssertionError(f"{self}: no {what} within {timeout:g} s; {self.describe()}")
            time.sleep(interval)


# --------------------------------------------------------------------------- FRR


class FrrRouter(_Router):
    """FRR zebra + bgpd in namespace ``ns``, sockets and files in
    ``workdir`` (made owned by user frr, as FRR needs: see DESIGN.md).
    zebra installs the learned routes into the namespace's kernel table."""

    DAEMONS = ("zebra", "bgpd")

    def config(self) -> str:
        lines = ["frr defaults traditional", f"hostname {self.ns}", "log file " + str(self.dir / "frr.log"), "!",
                 f"router bgp {self.asn}", f" bgp router-id {self.router_id}",
                 " no bgp ebgp-requires-policy", " no bgp network import-check",
                 " no bgp default ipv4-unicast"]
        for addr, asn in self.neighbors:
            lines += [f" neighbor {addr} remote-as {asn}", f" neighbor {addr} timers 3 9",
                      f" neighbor {addr} timers connect 1", f" neighbor {addr} advertisement-interval 0"]
        for fam in ("ipv4", "ipv6"):
            lines.append(f" address-family {fam} unicast")
            lines += [f"  neighbor {a} activate" for a, _ in self.neighbors if addr_family(a) == fam]
            lines += [f"  network {p}" for p in self.announced[fam]]
            lines.append(" exit-address-family")
        return "\n".join(lines + ["!", ""])

    def _write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text)
        shutil.chown(path, "frr", "frr")
        return path

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.dir, "frr", "frr")
        for parent in self.dir.resolve().parents:  # the daemons run as frr: they must reach workdir
            if not os.stat(parent).st_mode & 0o001:
                raise ValueError(f"{self}: user frr cannot reach {self.dir}: {parent} is not "
                                 "world-searchable (tmp_path and mkdtemp() dirs are 0700: chmod 0711)")
        common = ["-d", "-P", "0", "--vty_socket", str(self.dir), "-z", str(self.dir / "zserv.api")]
        try:
            for daemon, conf in (("zebra", ""), ("bgpd", self.config())):
                cfg = self._write(f"{daemon}.conf", conf)
                with open(self.dir / f"{daemon}.stderr", "w") as err:
                    p = subprocess.run(["ip", "netns", "exec", self.ns, str(FRR / daemon), *common,
                                        "-i", str(self.dir / f"{daemon}.pid"), "-f", str(cfg)],
                                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                       timeout=30)
                if p.returncode != 0:
                    raise RuntimeError(f"{daemon} in {self.ns} exited {p.returncode}: "
                                       f"{(self.dir / f'{daemon}.stderr').read_text().strip()}")
                if daemon == "zebra":
                    self._until(lambda: (self.dir / "zserv.api").exists(), "zebra's zserv.api")
            self._until(lambda: self.vtysh("show bgp summary", check=False), "bgpd answering vtysh")
        except BaseException:
            self.stop()
            raise

    def _until(self, cond: Callable[[], Any], what: str, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while not cond():
            if time.monotonic() >= end:
                raise RuntimeError(f"{self}: no {what} within {timeout:g} s")
            time.sleep(0.05)

    def stop(self) -> None:
        for daemon in reversed(self.DAEMONS):
            _stop_pidfile(self.dir / f"{daemon}.pid", daemon)

    def vtysh(self, *cmds: str, check: bool = True) -> str:
        """bgpd's answer to ``cmds`` (one vtysh session); with ``check`` an
        error line ("% ...") or a failed vtysh raises RuntimeError."""
        args = ["vtysh", "--vty_socket", str(self.dir), "-d", "bgpd"]
        for c in cmds:
            args += ["-c", c]
        try:
            p = _run(args, timeout=30)
        except subprocess.TimeoutExpired:
            if check:
                raise
            return ""
        if check and (p.returncode != 0 or re.search(r"^%", p.stdout, re.M)):
            raise RuntimeError(f"vtysh {cmds} in {self.ns}: rc {p.returncode}: {p.stdout.strip()} {p.stderr.strip()}")
        return p.stdout if p.returncode == 0 else ""

    def _network(self, prefix: str, add: bool) -> None:
        prefix = str(ipaddress.ip_network(prefix))
        fam = addr_family(prefix)
        self.vtysh("configure terminal", f"router bgp {self.asn}", f"address-family {fam} unicast",
                   f"{'' if add else 'no '}network {prefix}")
        if add and prefix not in self.announced[fam]:
            self.announced[fam].append(prefix)
        elif not add and prefix in self.announced[fam]:
            self.announced[fam].remove(prefix)

    def announce(self, prefix: str) -> None:
        self._network(prefix, True)

    def withdraw(self, prefix: str) -> None:
        self._network(prefix, False)

    def rib(self, family: str = "ipv4") -> dict[str, dict[str, Any]]:
        # FRR 8.4: "json detail" (not "detail json"); each prefix a list of a
        # header ({"prefix", "advertisedTo"}) followed by its paths
        out = self.vtysh(f"show bgp {family} unicast json detail")
        data = json.loads(out) if out.strip() else {}
        rib: dict[str, dict[str, Any]] = {}
        for prefix, entry in (data.get("routes") or {}).items():
            paths = entry.get("paths", []) if isinstance(entry, dict) else entry
            learned = [p for p in paths if "nexthops" in p and not (p.get("local") or p.get("sourced"))]
            if not learned:
                continue  # only the router's own announcement
            best = next((p for p in learned if _frr_best(p)), learned[0])
            rib[prefix] = {
                # the first next hop: the global address (an IPv6 path has the link-local one second)
                "next_hop": (best.get("nexthops") or [{}])[0].get("ip", ""),
                "communities": (best.get("community", {}).get("list", [])
                                + best.get("largeCommunity", {}).get("list", [])),
                "as_path": [int(x) for x in re.findall(r"\d+", best.get("aspath", {}).get("string", ""))],
                "best": _frr_best(best),
            }
        return rib

    def session_state(self, neighbor: str) -> str:
        neighbor = str(ipaddress.ip_address(neighbor))
        out = self.vtysh(f"show bgp neighbors {neighbor} json", check=False)
        data = json.loads(out) if out.strip() else {}
        return data.get(neighbor, {}).get("bgpState", "Unknown")


def _frr_best(path: dict) -> bool:
    b = path.get("bestpath")
    return bool(b.get("overall")) if isinstance(b, dict) else bool(b)


# -------------------------------------------------------------------------- BIRD


class BirdRouter(_Router):
    """BIRD 2 in namespace ``ns`` with its config, control socket, pidfile
    and log in ``workdir``. Announced prefixes are blackhole routes of a
    static protocol per family, the only routes exported to the neighbors;
    every route learned over BGP is exported to the kernel table."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sock = self.dir / "bird.ctl"
        self.conf = self.dir / "bird.conf"
        self.pidfile = self.dir / "bird.pid"

    @staticmethod
    def proto(neighbor: str) -> str:
        """The name of the BGP protocol of ``neighbor``."""
        return "bgp_" + re.sub(r"[^0-9a-fA-F]", "_", str(ipaddress.ip_address(neighbor)))

    def config(self) -> str:
        c = [f'log "{self.dir / "bird.log"}" all;', f"router id {self.router_id};", "",
             "protocol device { scan time 5; }", ""]
        for fam in ("ipv4", "ipv6"):
            n = fam[-1]
            c += [f"protocol kernel kernel{n} {{",
                  f"    {fam} {{ import none; export where source = RTS_BGP; }};",
                  "}", "",
                  f"protocol static static{n} {{", f"    {fam};"]
            c += [f"    route {p} blackhole;" for p in self.announced[fam]]
            c += ["}", ""]
        for addr, asn in self.neighbors:
            c += [f"protocol bgp {self.proto(addr)} {{",
                  f"    local as {self.asn};",
                  f"    neighbor {addr} as {asn};",
                  "    hold time 9;", "    keepalive time 3;",
                  "    connect delay time 1;", "    connect retry time 1;", "    error wait time 1, 5;",
                  f"    {addr_family(addr)} {{ import all; export where source = RTS_STATIC; }};",
                  "}", ""]
        return "\n".join(c)

    def birdc(self, *cmd: str, timeout: float = 20) -> str:
        p = _run(["birdc", "-s", str(self.sock), *cmd], timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"birdc {' '.join(cmd)} in {self.ns}: rc {p.returncode}: "
                               f"{p.stdout.strip()} {p.stderr.strip()}")
        return p.stdout

    def _status(self) -> str:
        try:
            return self.birdc("show", "status", timeout=5)
        except (RuntimeError, subprocess.TimeoutExpired):
            return ""

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config())
        try:
            # as root BIRD needs no -u/-g; without -f it forks once the config is read
            with open(self.dir / "bird.stderr", "w") as err:
                p = subprocess.run(["ip", "netns", "exec", self.ns, "bird", "-c", str(self.conf),
                                    "-s", str(self.sock), "-P", str(self.pidfile)],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, timeout=30)
            if p.returncode != 0:
                raise RuntimeError(f"bird in {self.ns} exited {p.returncode}: "
                                   f"{(self.dir / 'bird.stderr').read_text().strip()}")
            end = time.monotonic() + 30
            while "Daemon is up and running" not in self._status():
                if time.monotonic() >= end:
                    raise RuntimeError(f"{self}: no answer on {self.sock} within 30 s")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        _stop_pidfile(self.pidfile, "bird")

    def _reconfigure(self) -> None:
        self.conf.write_text(self.config())
        out = self.birdc("configure", timeout=30)
        if not re.search(r"^(0003 )?Reconfigur", out, re.M) or "error" in out.lower():
            raise RuntimeError(f"birdc configure in {self.ns}: {out.strip()}")
        end = time.monotonic() + 30
        while "Reconfiguration in progress" in (st := self._status()) or not st:
            if time.monotonic() >= end:
                raise RuntimeError(f"{self}: reconfiguration not done within 30 s: {st.strip()}")
            time.sleep(0.05)

    def _statics(self, fam: str) -> set[str]:
        out = self.birdc("show", "route", "protocol", f"static{fam[-1]}")
        return {m.group(1) for m in re.finditer(r"^(\S+/\d+)\s", out, re.M)}

    def announce(self, prefix: str) -> None:
        prefix = str(ipaddress.ip_network(prefix))
        fam = addr_family(prefix)
        if prefix not in self.announced[fam]:
            self.announced[fam].append(prefix)
        self._reconfigure()
        self.wait(lambda: prefix in self._statics(fam), f"static route {prefix}", 10)

    def withdraw(self, prefix: str) -> None:
        prefix = str(ipaddress.ip_network(prefix))
        fam = addr_family(prefix)
        if prefix in self.announced[fam]:
            self.announced[fam].remove(prefix)
        self._reconfigure()
        self.wait(lambda: prefix not in self._statics(fam), f"static route {prefix} gone", 10)

    def rib(self, family: str = "ipv4") -> dict[str, dict[str, Any]]:
        rib: dict[str, dict[str, Any]] = {}
        for addr, _ in self.neighbors:
            if addr_family(addr) != family:
                continue
            out = self.birdc("show", "route", "all", "protocol", self.proto(addr))
            for prefix, route in parse_bird_routes(out).items():
                if prefix not in rib or (route["best"] and not rib[prefix]["best"]):
                    rib[prefix] = route
        return rib

    def session_state(self, neighbor: str) -> str:
        name = self.proto(neighbor)
        try:
            out = self.birdc("show", "protocols", name, timeout=10)
        except (RuntimeError, subprocess.TimeoutExpired):
            return "Unknown"
        for line in out.splitlines():
            f = line.split()
            if f and f[0] == name:
                # name proto table state since info: "bgp_x BGP --- up 12:00:00.000 Established"
                return f[5] if len(f) > 5 else f[3]
        return "Unknown"


_ROUTE = re.compile(r"^(?:(\S+/\d+)\s+)?\s*(\w+)\s+\[(\S+)[^\]]*\]\s*(\*)?")


def parse_bird_routes(text: str) -> dict[str, dict[str, Any]]:
    """The routes of ``birdc show route all`` output, by prefix (the best
    one where a prefix has several)."""
    routes: dict[str, dict[str, Any]] = {}
    prefix: str | None = None
    cur: dict[str, Any] | None = None

    def done() -> None:
        if cur is not None and prefix is not None:
            if prefix not in routes or (cur["best"] and not routes[prefix]["best"]):
                routes[prefix] = cur

    for line in text.splitlines():
        if not line.strip() or line.startswith(("BIRD ", "Table ", "Access restricted")):
            continue
        m = _ROUTE.match(line) if not line.startswith("\t") else None
        if m and (m.group(1) or line.startswith(" ")):
            done()
            prefix = m.group(1) or prefix
            cur = {"next_hop": "", "communities": [], "as_path": [], "best": bool(m.group(4))}
            continue
        if cur is None:
            continue
        s = line.strip()
        if s.startswith("via ") and not cur["next_hop"]:
            cur["next_hop"] = s.split()[1]
        elif s.startswith("BGP.as_path:"):
            cur["as_path"] = [int(x) for x in re.findall(r"\d+", s.split(":", 1)[1])]
        elif s.startswith("BGP.community:"):
            cur["communities"] += [f"{a}:{b}" for a, b in re.findall(r"\((\d+),\s*(\d+)\)", s)]
        elif s.startswith("BGP.large_community:"):
            cur["communities"] += [f"{a}:{b}:{c}" for a, b, c in
                                   re.findall(r"\((\d+),\s*(\d+),\s*(\d+)\)", s)]
    done()
    return routes
