"""``patronus operator`` as a process: a real controller (tests/controller_server.py),
a kubeconfig whose API server is a loopback port nobody listens on (no
Kubernetes API exists here), the metrics and health servers on ports the
operator picks and logs. The operator must stay up and retry: /livez 200,
/readyz 503 naming the Kubernetes API, /metrics with every family and the
controller up, /healthz 200; SIGTERM exits 0 within 5 s.

Every wait is for an event (a log line, an answer), polled with a generous
bound, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kopf")
pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from .controller_server import running_controller  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
WAIT_S = 120.0   # a bound for the busy 2-core VM, not a margin: every wait ends on its event
_LISTENING = re.compile(r"metrics on http://(\S+):(\d+)/metrics, health on http://(\S+):(\d+) ")
FAMILIES = ("patronus_operator_reconciliations_total", "patronus_operator_reconcile_duration_seconds",
            "patronus_operator_errors_total", "patronus_operator_resources_managed",
            "patronus_operator_controller_up", "patronus_operator_kubernetes_up")


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S, every: float = 0.1) -> Any:
    end = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < end:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as e:
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@pytest.fixture
def dead_api_server() -> Iterator[int]:
    """A loopback port that refuses connections: bound (so nobody else takes it), never listening."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def kubeconfig(path: Path, port: int) -> Path:
    path.write_text(json.dumps({   # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "none", "cluster": {"server": f"https://127.0.0.1:{port}",
                                                  "insecure-skip-tls-verify": True}}],
        "users": [{"name": "op", "user": {"token": "not-a-real-token"}}],
        "contexts": [{"name": "test", "context": {"cluster": "none", "user": "op", "namespace": "default"}}]}))
    return path


class Operator:
    """``python -m patronus.cli operator ...`` with its stderr collected and scanned."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "patronus.cli", "operator", *args], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            self._q.put(line)
        self._q.put(None)

    def wait_line(self, pattern: re.Pattern[str], timeout: float = WAIT_S) -> re.Match[str]:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line matching {pattern.pattern!r}; log:\n{self.log()}") from None
            if line is None:
                raise AssertionError(f"the operator exited ({self.proc.wait()}) before {pattern.pattern!r}; "
                                     f"log:\n{self.log()}")
            m = pattern.search(line)
            if m:
                return m

    def log(self) -> str:
        return "".join(self.lines)[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_operator_runs_without_kubernetes_and_stops_on_sigterm(tmp_path: Path, dead_api_server: int) -> None:
    with running_controller(tmp_path / "ctl") as ctl:
        token = ctl.login("admin", ctl.admin_password)["access_token"]
        with ctl.client(token) as c:
            r = c.post("/api/v1/api-keys", json={"name": "operator", "role": "operator"})
            assert r.status_code == 201, r.text
            key = r.json()["secret"]
        key_file = tmp_path / "api-key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        op = Operator(["--controller", ctl.url, "--api-key-file", str(key_file), "--ca", ctl.cert,
                       "--kubeconfig", str(kubeconfig(tmp_path / "kubeconfig", dead_api_server)),
                       "--namespace", "default", "--listen-address", "127.0.0.1",
                       "--metrics-port", "0", "--health-port", "0"])
        try:
            m = op.wait_line(_LISTENING)
            metrics_url = f"http://{m.group(1)}:{m.group(2)}/metrics"
            health = f"http://{m.group(3)}:{m.group(4)}"
            with httpx.Client(timeout=10.0) as h:
                wait_for("/livez 200", lambda: h.get(f"{health}/livez").status_code == 200)
                assert h.get(f"{health}/livez").json() == {"status": "ok"}

                # the controller answers the operator's check; the Kubernetes API never does
                text = wait_for("controller_up 1 and kubernetes_up 0", lambda: (
                    lambda t: t if "patronus_operator_controller_up 1.0" in t
                    and "patronus_operator_kubernetes_up 0.0" in t else None)(h.get(metrics_url).text))
                for family in FAMILIES:
                    assert f"# TYPE {family.removesuffix('_total')} " in text or f"# TYPE {family} " in text, family
                assert 'patronus_operator_reconciliations_total{kind="Site",result="success"} 0.0' in text
                assert 'patronus_operator_resources_managed{kind="Policy"} 0.0' in text
                assert h.get(metrics_url).headers["content-type"].startswith("text/plain")

                r = h.get(f"{health}/readyz")
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["status"] == "not ready"
                assert body["missing"] and all(x.startswith("kubernetes API: ") for x in body["missing"]), body
                assert any(f"127.0.0.1:{dead_api_server}" in x for x in body["missing"]), body

                r = h.get(f"{health}/healthz")
                assert (r.status_code, r.json()) == (200, {"status": "ok", "broken": []})
            assert op.proc.poll() is None, op.log()
            assert key not in op.log()   # the API key is never logged

            t0 = time.monotonic()
            op.proc.send_signal(signal.SIGTERM)
            try:
                code = op.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"no exit within 5 s of SIGTERM; log:\n{op.log()}") from None
            took = time.monotonic() - t0
            assert code == 0, op.log()
            assert took < 5.0
        finally:
            op.stop()


# -- a fake Kubernetes API: what kopf uses of it, in memory ------------------------------------------------


class FakeKubernetes:
    """An in-memory API server for the two custom resources, served over HTTP
    on loopback in a thread of its own: API discovery, list, watch (a JSON
    line per event), merge and JSON patches of objects and of their status
    subresource (``generation`` follows spec changes, ``resourceVersion``
    every change), deletion held by finalizers, and events (stored). Enough
    for kopf as this operator configures it; not a Kubernetes."""

    GROUP, VERSION = "sdwan.patronus.dev", "v1"
    KINDS = {"sites": "Site", "policies": "Policy"}

    def __init__(self) -> None:
        import asyncio

        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}   # (plural, namespace, name) -> object
        self.events: list[dict[str, Any]] = []
        self.requests: list[str] = []
        self.rv = 0
        self.serve_group = True   # False: the CRDs are not installed (discovery does not list the group)
        self.lock = threading.Lock()
        self.watchers: list[tuple[str, str, Any, Any]] = []   # (plural, namespace, loop, queue)
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(30), "the fake API server did not start"

    # -- the server ---------------------------------------------------------------------------

    def _serve(self, ready: threading.Event) -> None:
        import asyncio

        from aiohttp import web

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.1)
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = runner.addresses[0][1]
        self.runner = runner
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        import asyncio

        for _, _, loop, q in list(self.watchers):   # end the watch streams first
            loop.call_soon_threadsafe(q.put_nowait, None)
        fut = asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop)
        try:
            fut.result(10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)

    def _resource(self, plural: str) -> dict[str, Any]:
        return {"name": plural, "singularName": plural[:-1] if plural == "sites" else "policy", "namespaced": True,
                "kind": self.KINDS[plural], "verbs": ["get", "list", "watch", "patch", "create", "delete",
                                                      "update"], "shortNames": []}

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        path, method = request.path.rstrip("/"), request.method
        self.requests.append(f"{method} {request.path_qs}")
        if path == "/api":
            return web.json_response({"versions": ["v1"]})
        if path == "/api/v1":
            return web.json_response({"resources": [
                {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
                 "verbs": ["list", "watch", "get"]},
                {"name": "events", "singularName": "event", "namespaced": True, "kind": "Event",
                 "verbs": ["create", "list", "watch"]}]})
        if path == "/apis":
            gv = {"groupVersion": f"{self.GROUP}/{self.VERSION}", "version": self.VERSION}
            return web.json_response({"groups": [{"name": self.GROUP, "versions": [gv], "preferredVersion": gv}]
                                      if self.serve_group else []})
        if path == f"/apis/{self.GROUP}/{self.VERSION}" and self.serve_group:
            return web.json_response({"resources": [
                *[self._resource(p) for p in self.KINDS], *[{"name": f"{p}/status", "singularName": "",
                                                            "namespaced": True, "kind": self.KINDS[p],
                                                            "verbs": ["get", "patch", "update"]}
                                                           for p in self.KINDS]]})
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/events", path)
        if m and method == "POST":
            self.events.append(await request.json())
            return web.json_response({}, status=201)
        m = re.fullmatch(rf"/apis/{self.GROUP}/{self.VERSION}/namespaces/([^/]+)/(sites|policies)(?:/([^/]+))?"
                         r"(/status)?", path)
        if not m:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        ns, plural, name, sub = m.groups()
        if name is None and method == "GET" and request.query.get("watch") == "true":
            return await self._watch(request, plural, ns)
        if name is None and method == "GET":
            with self.lock:
                items = [o for (p, n, _), o in self.objects.items() if p == plural and n == ns]
                return web.json_response({"apiVersion": f"{self.GROUP}/{self.VERSION}",
                                          "kind": f"{self.KINDS[plural]}List",
                                          "metadata": {"resourceVersion": str(self.rv)}, "items": items})
        if name is not None and method == "PATCH":
            return self._patch(plural, ns, name, await request.json(), request.content_type, bool(sub))
        return web.json_response({"kind": "Status", "code": 405}, status=405)

    async def _watch(self, request: Any, plural: str, ns: str) -> Any:
        import asyncio

        from aiohttp import web

        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        w = (plural, ns, self.loop, q)
        self.watchers.append(w)
        try:
            while True:
                ev = await q.get()
                if ev is None:
                    break
                await resp.write(json.dumps(ev).encode() + b"\n")
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.watchers.remove(w)
        return resp

    def _notify(self, plural: str, ns: str, type_: str, obj: dict[str, Any]) -> None:
        import copy

        for p, n, loop, q in list(self.watchers):
            if p == plural and n == ns:
                loop.call_soon_threadsafe(q.put_nowait, {"type": type_, "object": copy.deepcopy(obj)})

    def _patch(self, plural: str, ns: str, name: str, payload: Any, ctype: str, status_sub: bool) -> Any:
        import copy

        import jsonpatch
        from aiohttp import web

        with self.lock:
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return web.json_response({"kind": "Status", "code": 404}, status=404)
            new = copy.deepcopy(obj)
            if ctype == "application/json-patch+json":
                try:
                    new = jsonpatch.apply_patch(new, payload)
                except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as e:
                    return web.json_response({"kind": "Status", "code": 422, "message": str(e)}, status=422)
            else:   # merge patch
                if status_sub:
                    payload = {"status": payload.get("status", {})}
                else:
                    payload = {k: v for k, v in payload.items() if k != "status"}
                new = _merge(new, payload)
            if not status_sub:
                new["status"] = obj.get("status", {})
            return web.json_response(self._store(plural, ns, name, new, obj))

    def _store(self, plural: str, ns: str, name: str, new: dict[str, Any], old: dict[str, Any] | None) -> Any:
        self.rv += 1
        meta = new.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.rv)
        if old is None:
            meta["generation"] = 1
        elif new.get("spec") != old.get("spec"):
            meta["generation"] = old["metadata"]["generation"] + 1
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self.objects.pop((plural, ns, name), None)
            self._notify(plural, ns, "DELETED", new)
        else:
            self.objects[(plural, ns, name)] = new
            self._notify(plural, ns, "ADDED" if old is None else "MODIFIED", new)
        return new

    # -- what the test does (as kubectl would) ----------------------------------------------------------

    def apply(self, plural: str, name: str, spec: dict[str, Any], ns: str = "default") -> None:
        import copy

        with self.lock:
            old = self.objects.get((plural, ns, name))
            if old is None:
                new = {"apiVersion": f"{self.GROUP}/{self.VERSION}", "kind": self.KINDS[plural],
                       "metadata": {"name": name, "namespace": ns, "uid": f"uid-{plural}-{name}",
                                    "creationTimestamp": "2025-01-01T00:00:00Z"}, "spec": spec}
            else:
                new = copy.deepcopy(old)
                new["spec"] = spec
            self._store(plural, ns, name, new, old)

    def delete(self, plural: str, name: str, ns: str = "default") -> None:
        import copy

        with self.lock:
            old = self.objects[(plural, ns, name)]
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
            self._store(plural, ns, name, new, old)

    def get(self, plural: str, name: str, ns: str = "default") -> dict[str, Any] | None:
        import copy

        with self.lock:
            o = self.objects.get((plural, ns, name))
            return copy.deepcopy(o) if o is not None else None


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v)
    return out


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c.get("type") == type_:
            return dict(c)
    return {}


def test_operator_with_a_kubernetes_api(tmp_path: Path) -> None:
    """kopf end to end against the fake API: finalizer, create, update, status timer, invalid spec,
    deletion; /readyz 200 once both kinds are watched and the controller answers; SIGTERM exits 0."""
    from patronus import client as pc

    k8s = FakeKubernetes()
    try:
        kc = tmp_path / "kubeconfig"
        kc.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{k8s.port}"}}],
            "users": [{"name": "op", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "op", "namespace": "default"}}]}))
        with running_controller(tmp_path / "ctl") as ctl:
            token = ctl.login("admin", ctl.admin_password)["access_token"]
            with ctl.client(token) as c:
                key = c.post("/api/v1/api-keys", json={"name": "op", "role": "operator"}).raise_for_status().json()
                admin_key = c.post("/api/v1/api-keys", json={"name": "t", "role": "admin"}).raise_for_status().json()
            op = Operator(["--controller", ctl.url, "--ca", ctl.cert, "--kubeconfig", str(kc),
                           "--namespace", "default", "--listen-address", "127.0.0.1", "--metrics-port", "0",
                           "--health-port", "0", "--log-format", "json"], env={"PATRONUS_API_KEY": key["secret"]})
            try:
                m = op.wait_line(_LISTENING)
                health = f"http://{m.group(3)}:{m.group(4)}"
                metrics_url = f"http://{m.group(1)}:{m.group(2)}/metrics"
                with httpx.Client(timeout=10.0) as h, pc.Controller(ctl.url, api_key=admin_key["secret"],
                                                                    verify=ctl.cert) as admin:
                    wait_for("/readyz 200", lambda: h.get(f"{health}/readyz").status_code == 200)
                    assert h.get(f"{health}/readyz").json() == {"status": "ready", "missing": []}

                    spec = {"subnets": ["10.1.0.0/24"], "uplinks": [{"name": "isp1", "address": "192.0.2.1"}]}
                    k8s.apply("sites", "hq", spec)
                    wait_for("hq synced", lambda: condition(k8s.get("sites", "hq"), "Synced").get("status") == "True")
                    hq = k8s.get("sites", "hq")
                    assert hq is not None
                    assert hq["metadata"]["finalizers"] == ["sdwan.patronus.dev/finalizer"]
                    assert hq["status"]["observedGeneration"] == 1
                    assert condition(hq, "Synced")["reason"] == "Created"
                    assert "sdwan.patronus.dev/last-handled-configuration" in hq["metadata"]["annotations"]
                    assert set(hq["status"]) <= {"observedGeneration", "conditions", "state", "uplinks", "paths",
                                                 "pathsUp"}   # kopf keeps its own state in annotations
                    assert admin.site("hq").to_dict()["uplinks"][0]["address"] == "192.0.2.1"

                    # a spec change: the controller follows, observedGeneration too
                    spec2 = {**spec, "uplinks": [{"name": "isp1", "address": "192.0.2.7"}]}
                    k8s.apply("sites", "hq", spec2)
                    wait_for("generation 2 synced", lambda: (lambda o: o["status"].get("observedGeneration") == 2
                             and condition(o, "Synced")["reason"] == "Updated")(k8s.get("sites", "hq")))
                    assert admin.site("hq").to_dict()["uplinks"][0]["address"] == "192.0.2.7"
                    # the status timer writes the live state
                    wait_for("hq's live state", lambda: (k8s.get("sites", "hq") or {})["status"].get("state")
                             == "Pending")
                    assert k8s.get("sites", "hq")["status"]["uplinks"] == 1

                    # an invalid policy: Degraded, not retried
                    k8s.apply("policies", "bad", {"match": {"proto": "udp"}, "priority": -1})
                    wait_for("bad degraded", lambda: condition(k8s.get("policies", "bad"), "Degraded").get("status")
                             == "True")
                    assert condition(k8s.get("policies", "bad"), "Degraded")["reason"] == "Invalid"
                    assert condition(k8s.get("policies", "bad"), "Degraded")["message"].startswith("Policy.priority")

                    # deletion: the finalizer holds the object until the controller's site is gone
                    k8s.delete("sites", "hq")
                    wait_for("hq gone", lambda: k8s.get("sites", "hq") is None)
                    with pytest.raises(pc.NotFound):
                        admin.site("hq")
                    k8s.delete("policies", "bad")
                    wait_for("bad gone", lambda: k8s.get("policies", "bad") is None)

                    text = h.get(metrics_url).text
                    ok_ = re.search(r'patronus_operator_reconciliations_total\{kind="Site",result="success"\} (\S+)', text)
                    assert ok_ and float(ok_.group(1)) >= 3, text   # create, update, delete
                    assert re.search(r'patronus_operator_reconciliations_total\{kind="Policy",'
                                     r'result="permanent_error"\} [1-9]', text), text
                    assert 'patronus_operator_errors_total{kind="Policy",type="InvalidInput"}' in text
                    assert "patronus_operator_kubernetes_up 1.0" in text
                    # Kubernetes events: one per change, and kopf's own about the failures
                    wait_for("the events", lambda: {"Created", "Updated", "Removed"} <= {
                        e.get("reason") for e in list(k8s.events)})
                    assert any(e.get("type") == "Error" and "Policy.priority" in e.get("message", "")
                               and e["involvedObject"]["name"] == "bad" for e in list(k8s.events)), k8s.events

                    # what kopf asked of the API: the chart's RBAC (list/watch/patch of both kinds, patch of
                    # their status, create of events) and discovery; no namespaces, CRDs or peering objects
                    asked = set()
                    for r in list(k8s.requests):
                        method, url = r.split(" ", 1)
                        path = url.split("?", 1)[0]
                        m = re.fullmatch(r"/apis/sdwan\.patronus\.dev/v1/namespaces/default/(sites|policies)"
                                         r"(?:/[^/]+(/status)?)?", path)
                        if m:
                            verb = {"PATCH": "patch"}.get(method, "watch" if "watch=true" in url else "list")
                            asked.add((verb, m.group(1) + (m.group(2) or "")))
                        elif re.fullmatch(r"/api/v1/namespaces/default/events", path):
                            asked.add((method.lower(), "events"))
                        else:
                            assert method == "GET" and path in ("/api", "/api/v1", "/apis",
                                                                "/apis/sdwan.patronus.dev/v1"), r
                    assert asked == {("list", "sites"), ("watch", "sites"), ("patch", "sites"),
                                     ("patch", "sites/status"), ("list", "policies"), ("watch", "policies"),
                                     ("patch", "policies"), ("patch", "policies/status"), ("post", "events")}, asked

                    op.proc.send_signal(signal.SIGTERM)
                    assert op.proc.wait(timeout=5.0) == 0, op.log()
                for line in op.lines:   # --log-format json: one object a line
                    json.loads(line)
            finally:
                op.stop()
    finally:
        k8s.close()


def test_bad_options_exit_2_naming_the_option(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PATRONUS_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "patronus.cli", "operator", "--controller", "https://127.0.0.1:1"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=WAIT_S)
    assert r.returncode == 2
    assert "--api-key-file" in r.stderr and "PATRONUS_API_KEY" in r.stderr
    r = subprocess.run([sys.executable, "-m", "patronus.cli", "operator", "--controller", "http://x:1"],
                       capture_output=True, text=True, env={**env, "PATRONUS_API_KEY": "pnk_secret"}, cwd=ROOT,
                       timeout=WAIT_S)
    assert r.returncode == 2 and "--controller" in r.stderr and "pnk_secret" not in r.stderr + r.stdout
