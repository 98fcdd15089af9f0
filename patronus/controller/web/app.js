// The dashboard's page logic: login (with TOTP), the topology map and the
// failover timeline (live over GraphQL subscriptions), sites and policies
// with create / edit / delete, the server's validation errors next to
// the field they name. Role-aware: a viewer gets no edit controls (and the
// server refuses its writes anyway).

import { ApiError, Live, Session } from "./api.js";
import { TopologyMap, quality, scoreText, stateClass } from "./map.js";
import { MetricChart } from "./chart.js";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

const session = new Session();
const live = new Live(session);
const state = { me: null, sites: [], policies: [], events: [], pathStates: new Map(), edges: [], nodes: [],
                agents: [], selected: null };   // selected: {kind: "path" | "site", id}
const map = new TopologyMap($("#map"), { onselect: (id) => openPath(id), onsite: (id) => openSite(id) });
const chart = new MetricChart($("#path-chart"));
const HOUR = 3600;
const TIMELINE_MAX = 200;

const OVERVIEW = `query Overview {
  me { name role kind }
  sites { name subnets uplinks { name address } etag status }
  policies { name priority app action prefer etag
             match { src dst srcPorts dstPorts proto dscp } }
  topology { nodes { id uplinks } edgeCount
             edges(first: 1000) { items { id source target sourceUplink targetUplink } nextCursor } }
  paths { id state { status reason since } latest { ts rttMs jitterMs lossPct mos } }
  agents { id site hostname status lastSeen revoked }
  events(first: 100) { id ts site policy fromPath toPath reason detail }
}`;

// -- small helpers -------------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return e;
}

function fmtTime(ts) {
  const d = new Date(ts * 1000);
  const pad = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

let toastTimer = null;
function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 4000);
}

const canWrite = () => state.me && (state.me.role === "admin" || state.me.role === "operator");

// -- login -------------------------------------------------------------------------------------------

$("#login-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  const err = $("#login-error");
  err.textContent = "";
  const btn = $("button[type=submit]", f);
  btn.disabled = true;
  try {
    await session.login(f.name.value.trim(), f.password.value, f.totp.value.trim() || undefined);
    f.password.value = "";
    f.totp.value = "";
    $("#login-totp-row").hidden = true;
    await start();
  } catch (e) {
    if (e instanceof ApiError && e.problem.totp_required) {
      $("#login-totp-row").hidden = false;
      err.textContent = f.totp.value ? (e.message || "wrong code") : "Enter the code from your authenticator app.";
      $("#login-totp").focus();
    } else {
      err.textContent = e instanceof ApiError ? e.message : "cannot reach the controller";
    }
  } finally {
    btn.disabled = false;
  }
});

$("#logout").addEventListener("click", async () => {
  live.stop();
  await session.logout();
  showLogin("Logged out.");
});

session.onchange = () => { if (!live.stopped) live.renew(); };
session.onexpired = () => { live.stop(); session.clear(); showLogin("Your session ended: log in again."); };

function showLogin(message = "") {
  state.me = null;
  document.body.classList.remove("can-write", "logged-in");
  $("#login-view").hidden = false;
  $("#nav").hidden = true;
  $("#who").hidden = true;
  for (const v of $$(".view")) v.hidden = true;
  for (const tb of $$("#audit-table tbody, #tokens-table tbody, #flows-top tbody, #flows-totals tbody")) tb.textContent = "";
  $("#token-new").hidden = true;
  $("#token-value").value = "";
  closeDetail();
  $("#login-error").textContent = message;
  $("#login-name").focus();
}

async function start() {
  const out = await session.graphql(OVERVIEW);
  if (!out.data || !out.data.me) throw new ApiError(500, { detail: "no data from the controller" });
  state.me = out.data.me;
  document.body.classList.add("logged-in");
  document.body.classList.toggle("can-write", canWrite());
  for (const e of $$(".write")) e.hidden = !canWrite() || e.tagName === "FORM";   // forms open on demand
  for (const a of $$("#nav a[data-roles]")) a.hidden = !a.dataset.roles.split(" ").includes(state.me.role);
  $("#who-name").textContent = state.me.name;
  $("#who-role").textContent = state.me.role;
  $("#login-view").hidden = true;
  $("#nav").hidden = false;
  $("#who").hidden = false;
  takeOverview(out.data);
  route();
  startLive();
}

// -- data -----------------------------------------------------------------------------------------

function takeOverview(d) {
  state.sites = d.sites || [];
  state.policies = d.policies || [];
  const topo = d.topology || { nodes: [], edges: { items: [] }, edgeCount: 0 };
  state.edges = topo.edges.items;
  const status = new Map(state.sites.map((s) => [s.name, s.status]));
  state.nodes = topo.nodes.map((n) => ({ id: n.id, uplinks: n.uplinks, status: status.get(n.id) }));
  state.agents = d.agents || [];
  for (const p of d.paths || []) {
    if (p.latest) map.scores.set(p.id, p.latest);
    if (p.state && !state.pathStates.has(p.id)) state.pathStates.set(p.id, p.state.status);
    else if (!state.pathStates.has(p.id)) state.pathStates.set(p.id, "unknown");
  }
  state.events = (d.events || []).slice().sort((a, b) => b.ts - a.ts);
  renderMap(topo.edgeCount);
  renderSites();
  renderPolicies();
  renderTimeline();
  if (state.selected) map.select(state.selected.kind, state.selected.id);
}

async function reload() {
  const out = await session.graphql(OVERVIEW);
  if (out.data) takeOverview(out.data);
}

function renderMap(edgeCount) {
  map.render(state.nodes, state.edges, state.pathStates);
  const down = state.edges.filter((e) => map.states.get(e.id) === "down").length;
  const shown = state.edges.length < edgeCount ? ` (first ${state.edges.length} drawn)` : "";
  $("#map-summary").textContent = `${state.nodes.length} sites, ${edgeCount} paths${shown}, ${down} down`;
}

function renderTimeline() {
  for (const list of [$("#timeline"), $("#timeline-mini")]) {
    list.textContent = "";
    const items = list.id === "timeline-mini" ? state.events.slice(0, 12) : state.events;
    if (!items.length) list.appendChild(h("li", { class: "muted empty" }, "No failover events."));
    for (const ev of items) list.appendChild(eventItem(ev));
  }
}

function eventItem(ev) {
  const move = ev.fromPath || ev.toPath ? h("span", { class: "move" }, ev.fromPath || "–", " → ", ev.toPath || "–") : null;
  return h("li", { class: `event ${/down|fail|loss|sla/.test(ev.reason) ? "bad" : "good"}`, "data-reason": ev.reason,
                   "data-from": ev.fromPath || "", "data-site": ev.site || "" },
    h("time", { datetime: new Date(ev.ts * 1000).toISOString() }, fmtTime(ev.ts)),
    h("span", { class: "reason" }, ev.reason),
    ev.site ? h("span", { class: "site" }, ev.site) : null,
    ev.policy ? h("span", { class: "policy" }, `policy ${ev.policy}`) : null,
    move,
    ev.detail ? h("span", { class: "detail" }, ev.detail) : null);
}

function prependEvent(ev) {
  state.events.unshift(ev);
  if (state.events.length > TIMELINE_MAX) state.events.length = TIMELINE_MAX;
  for (const list of [$("#timeline"), $("#timeline-mini")]) {
    const empty = $(".empty", list);
    if (empty) empty.remove();
    list.insertBefore(eventItem(ev), list.firstChild);
    if (list.id === "timeline-mini") while (list.children.length > 12) list.lastChild.remove();
  }
}

// -- live ------------------------------------------------------------------------------------------

function startLive() {
  live.stop();
  live.onstate = (s) => { const e = $("#live"); e.textContent = s; e.className = `live ${s}`; };
  live.subscribe("subscription { pathState { ts site path state diag } }", {}, (d) => {
    const s = d.pathState;
    state.pathStates.set(s.path, s.state);
    map.setState(s.path, s.state);
    if (state.selected && state.selected.kind === "path" && state.selected.id === s.path) showBfd(s.state, s.ts, s.diag);
    const down = state.edges.filter((e) => map.states.get(e.id) === "down" || map.states.get(e.id) === "admin_down").length;
    $("#map-summary").textContent = $("#map-summary").textContent.replace(/\d+ down$/, `${down} down`);
  });
  live.subscribe("subscription { failoverMoves { ts site reason policy toSite fromPath toPath detail received } }", {},
    (d) => {
      const m = d.failoverMoves;
      prependEvent({ ts: m.ts, site: m.site, policy: m.policy, fromPath: m.fromPath, toPath: m.toPath,
                     reason: m.reason, detail: m.detail });
      if (m.policy) renderPolicies();
    });
  live.subscribe("subscription { pathMetrics { ts site path rttMs jitterMs lossPct mos } }", {}, (d) => {
    const m = d.pathMetrics;
    map.setScore(m.path, m);
    if (state.selected && state.selected.kind === "path" && state.selected.id === m.path) {
      chart.add(m);
      $("#path-latest").textContent = scoreText(m);
    }
  });
  live.subscribe("subscription { siteStatus { site status previous } }", {}, (d) => {
    const s = d.siteStatus;
    const site = state.sites.find((x) => x.name === s.site);
    if (site) site.status = s.status;
    const node = state.nodes.find((x) => x.id === s.site);
    if (node) node.status = s.status;
    map.setSiteStatus(s.site, s.status);
    renderSites();
    if (state.selected && state.selected.kind === "site" && state.selected.id === s.site) loadAgents().catch(() => {});
  });
  // a site or policy changed, here or elsewhere (another tab, the API, the operator): one reload for a burst
  let pending = null;
  const changed = () => {
    clearTimeout(pending);
    pending = setTimeout(() => reload().catch(() => {}), 150);
  };
  live.subscribe("subscription { policyChanges { type target } }", {}, changed);
  live.subscribe("subscription { siteChanges { type target } }", {}, changed);
  live.start();
}

// -- sites -----------------------------------------------------------------------------------------

function renderSites() {
  const tb = $("#sites-table tbody");
  tb.textContent = "";
  if (!state.sites.length) tb.appendChild(h("tr", {}, h("td", { colspan: 5, class: "muted" }, "No sites yet.")));
  for (const s of state.sites) {
    tb.appendChild(h("tr", { "data-site": s.name },
      h("th", { scope: "row", "data-label": "Name" }, s.name),
      h("td", { "data-label": "Status" }, h("span", { class: `status ${String(s.status).toLowerCase()}` }, s.status)),
      h("td", { "data-label": "Subnets" }, s.subnets.join(", ")),
      h("td", { "data-label": "Uplinks" }, s.uplinks.map((u) => `${u.name} ${u.address}`).join(", ")),
      canWrite() ? h("td", { class: "actions" },
        h("button", { type: "button", class: "edit", "aria-label": `Edit site ${s.name}`, onclick: () => editSite(s) }, "Edit"),
        h("button", { type: "button", class: "delete", "aria-label": `Delete site ${s.name}`, onclick: () => deleteSite(s) }, "Delete"))
        : null));
  }
}

const siteForm = $("#site-form");
let siteEditing = null;

$("#site-new").addEventListener("click", () => editSite(null));
$(".cancel", siteForm).addEventListener("click", () => { siteForm.hidden = true; $("#site-new").focus(); });

function editSite(s) {
  siteEditing = s;
  clearErrors(siteForm);
  $("#site-form-title").textContent = s ? `Edit site ${s.name}` : "New site";
  siteForm.name.value = s ? s.name : "";
  siteForm.name.readOnly = !!s;
  siteForm.subnets.value = s ? s.subnets.join("\n") : "";
  siteForm.uplinks.value = s ? s.uplinks.map((u) => `${u.name} ${u.address}`).join("\n") : "";
  siteForm.hidden = false;
  (s ? siteForm.subnets : siteForm.name).focus();
}

siteForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearErrors(siteForm);
  const f = siteForm;
  const body = {
    name: f.name.value.trim(),
    subnets: f.subnets.value.split(/[\s,]+/).filter(Boolean),
    uplinks: f.uplinks.value.split("\n").map((l) => l.trim()).filter(Boolean).map((l) => {
      const [name, address] = l.split(/[\s,]+/);
      return { name: name || "", address: address || "" };
    }),
  };
  try {
    if (siteEditing) {
      await session.rest("PUT", `/sites/${encodeURIComponent(siteEditing.name)}`, body, { "If-Match": siteEditing.etag });
    } else {
      await session.rest("POST", "/sites", body);
    }
    f.hidden = true;
    toast(`site ${body.name} saved`);
    await reload();
  } catch (e) {
    showError(f, e, siteField);
  }
});

async function deleteSite(s) {
  if (!window.confirm(`Delete site ${s.name}?`)) return;
  try {
    await session.rest("DELETE", `/sites/${encodeURIComponent(s.name)}`, undefined, { "If-Match": s.etag });
    toast(`site ${s.name} deleted`);
    await reload();
  } catch (e) {
    toast(e.message);
  }
}

function siteField(field) {
  if (/^(Uplink\.|uplinks)/.test(field)) return "uplinks";
  return lastPart(field);
}

// -- policies --------------------------------------------------------------------------------------

function ordered(policies) {   // evaluation order: priority, then the order they were defined (a stable sort)
  return policies.map((p, i) => [p, i]).sort((a, b) => a[0].priority - b[0].priority || a[1] - b[1]).map((x) => x[0]);
}

function matchText(m) {
  const parts = [];
  if (m.proto !== null && m.proto !== undefined) parts.push(`proto ${Array.isArray(m.proto) ? m.proto.join(",") : m.proto}`);
  if (m.src) parts.push(`src ${m.src}`);
  if (m.srcPorts) parts.push(`sport ${m.srcPorts}`);
  if (m.dst) parts.push(`dst ${m.dst}`);
  if (m.dstPorts) parts.push(`dport ${m.dstPorts}`);
  if (m.dscp !== null && m.dscp !== undefined) parts.push(`dscp ${m.dscp}`);
  return parts.join(" ") || "any";
}

function renderPolicies() {
  const tb = $("#policies-table tbody");
  tb.textContent = "";
  const list = ordered(state.policies);
  if (!list.length) tb.appendChild(h("tr", {}, h("td", { colspan: 8, class: "muted" }, "No policies yet.")));
  list.forEach((p, i) => {
    tb.appendChild(h("tr", { "data-policy": p.name },
      h("td", { "data-label": "#" }, i + 1),
      h("td", { "data-label": "Priority" }, p.priority),
      h("th", { scope: "row", "data-label": "Name" }, p.name),
      h("td", { "data-label": "Match" }, matchText(p.match)),
      h("td", { "data-label": "App" }, p.app),
      h("td", { "data-label": "Action" }, p.action === "drop" ? "drop" : (p.prefer.length ? `prefer ${p.prefer.join(", ")}` : "forward")),
      pathNowCell(p),
      canWrite() ? h("td", { class: "actions" },
        h("button", { type: "button", class: "edit", "aria-label": `Edit policy ${p.name}`, onclick: () => editPolicy(p) }, "Edit"),
        h("button", { type: "button", class: "delete", "aria-label": `Delete policy ${p.name}`, onclick: () => deletePolicy(p) }, "Delete"))
        : null));
  });
}

// the path a policy uses now, where known: the latest failover move of that policy, per site
function pathNow(name) {
  const bySite = new Map();
  for (const ev of state.events) {   // latest first
    if (ev.policy !== name || !ev.toPath) continue;
    const key = ev.site || "";
    if (!bySite.has(key)) bySite.set(key, ev);
  }
  return [...bySite.values()];
}

function pathNowCell(p) {
  const now = pathNow(p.name);
  if (!now.length) return h("td", { "data-label": "Path now", class: "path-now muted" }, "not known yet");
  return h("td", { "data-label": "Path now", class: "path-now" }, now.map((ev) => {
    const st = stateClass(state.pathStates.get(ev.toPath));
    return h("span", { class: `path-ref ${st}`, "data-path": ev.toPath, title: `since ${fmtTime(ev.ts)} (${ev.reason})` },
      ev.site ? `${ev.site}: ` : "", ev.toPath);
  }));
}

const policyForm = $("#policy-form");
let policyEditing = null;

$("#policy-new").addEventListener("click", () => editPolicy(null));
$(".cancel", policyForm).addEventListener("click", () => { policyForm.hidden = true; $("#policy-new").focus(); });

function editPolicy(p) {
  policyEditing = p;
  clearErrors(policyForm);
  const f = policyForm;
  $("#policy-form-title").textContent = p ? `Edit policy ${p.name}` : "New policy";
  f.name.value = p ? p.name : "";
  f.name.readOnly = !!p;
  f.priority.value = p ? p.priority : "";
  f.app.value = p ? p.app : "default";
  f.action.value = p ? p.action : "forward";
  const m = p ? p.match : {};
  f.proto.value = m.proto === null || m.proto === undefined ? "" : (Array.isArray(m.proto) ? m.proto.join(",") : m.proto);
  f.src.value = m.src || "";
  f.dst.value = m.dst || "";
  f.dst_ports.value = m.dstPorts || "";
  f.dscp.value = m.dscp === null || m.dscp === undefined ? "" : m.dscp;
  f.prefer.value = p ? p.prefer.join(", ") : "";
  f.hidden = false;
  (p ? f.priority : f.name).focus();
}

const numOr = (s) => (/^-?\d+$/.test(s) ? Number(s) : s);

policyForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  clearErrors(policyForm);
  const f = policyForm;
  const v = (name) => f[name].value.trim();
  const match = {};
  if (v("proto")) match.proto = numOr(v("proto"));
  if (v("src")) match.src = v("src");
  if (v("dst")) match.dst = v("dst");
  if (v("dst_ports")) match.dst_ports = numOr(v("dst_ports"));
  if (v("dscp")) match.dscp = numOr(v("dscp"));
  const body = { name: v("name"), priority: numOr(v("priority")), app: v("app") || "default", action: v("action"),
                 match, prefer: v("prefer").split(/[\s,]+/).filter(Boolean) };
  try {
    if (policyEditing) {
      await session.rest("PUT", `/policies/${encodeURIComponent(policyEditing.name)}`, body, { "If-Match": policyEditing.etag });
    } else {
      await session.rest("POST", "/policies", body);
    }
    f.hidden = true;
    toast(`policy ${body.name} saved`);
    await reload();
  } catch (e) {
    showError(f, e, lastPart);
  }
});

async function deletePolicy(p) {
  if (!window.confirm(`Delete policy ${p.name}?`)) return;
  try {
    await session.rest("DELETE", `/policies/${encodeURIComponent(p.name)}`, undefined, { "If-Match": p.etag });
    toast(`policy ${p.name} deleted`);
    await reload();
  } catch (e) {
    toast(e.message);
  }
}

// -- errors next to their field -------------------------------------------------------------------

function lastPart(field) {
  return String(field).replace(/\[\d+\]/g, "").split(".").pop();
}

function clearErrors(form) {
  for (const e of $$(".field-error", form)) e.textContent = "";
  for (const e of $$("[aria-invalid]", form)) e.removeAttribute("aria-invalid");
  $(".form-error", form).textContent = "";
}

function showError(form, e, toName) {
  if (!(e instanceof ApiError)) {
    $(".form-error", form).textContent = "cannot reach the controller";
    return;
  }
  const problems = e.problem.errors && e.problem.errors.length ? e.problem.errors : [{ field: e.field, detail: e.message }];
  let first = null;
  for (const p of problems) {
    const name = p.field ? toName(p.field) : null;
    const slot = name ? $(`.field-error[data-for="${CSS.escape(name)}"]`, form) : null;
    if (slot) {
      slot.textContent = p.detail || e.message;
      const input = form.elements[name];
      if (input) {
        input.setAttribute("aria-invalid", "true");
        if (!slot.id) slot.id = `${form.id}-${name}-error`;
        input.setAttribute("aria-describedby", slot.id);
        first = first || input;
      }
    } else {
      $(".form-error", form).textContent = `${e.status === 403 ? "Not allowed: " : ""}${p.detail || e.message}`;
    }
  }
  if (first) first.focus();
}

// -- views -----------------------------------------------------------------------------------------

function route() {
  if (!state.me) return;
  const name = (location.hash.match(/^#\/(\w+)/) || [])[1] || "map";
  const link = $(`#nav a[data-view="${CSS.escape(name)}"]`);
  const view = link && !link.hidden && $$(".view").find((v) => v.dataset.view === name) ? name : "map";
  for (const v of $$(".view")) v.hidden = v.dataset.view !== view;
  for (const a of $$("#nav a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const load = { flows: loadFlows, tokens: loadTokens, audit: loadAudit }[view];
  if (load) load().catch((e) => toast(e.message || String(e)));
}

// -- GraphQL with errors as exceptions -----------------------------------------------------------

async function gql(query, variables = {}) {
  const out = await session.graphql(query, variables);
  if (out.errors && out.errors.length) {
    const e = out.errors[0];
    const x = e.extensions || {};
    throw new ApiError(x.status || (x.code === "FORBIDDEN" ? 403 : 400), { detail: e.message, field: x.field || null });
  }
  return out.data;
}

const num = (v) => Number(v || 0);

function fmtBytes(n) {
  n = num(n);
  const u = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < u.length - 1) { n /= 1000; i++; }
  return `${i ? n.toFixed(1) : n} ${u[i]}`;
}

const PROTO = { 1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6" };
const flowText = (f) => `${PROTO[f.proto] || f.proto} ${f.src}:${f.sport} → ${f.dst}:${f.dport}`;

// -- details: a path or a site, next to the map ---------------------------------------------------

const PATH_Q = `query PathDetail($id: String!, $start: Time) {
  path(id: $id) { id sites uplinks state { status reason since detail } latest { ts rttMs jitterMs lossPct mos }
                  history(start: $start, first: 1000) { items { ts rttMs jitterMs lossPct mos } nextCursor } }
}`;

function openDetail(kind, id, title) {
  state.selected = { kind, id };
  map.select(kind, id);
  $("#detail").hidden = false;
  $("#detail").dataset.kind = kind;
  $("#detail").dataset.id = id;
  $("#detail-title").textContent = title;
  $("#path-detail").hidden = kind !== "path";
  $("#site-detail").hidden = kind !== "site";
  $("#detail").focus();
}

function closeDetail() {
  const was = state.selected;
  state.selected = null;
  map.select(null, null);
  $("#detail").hidden = true;
  return was;
}

$("#detail-close").addEventListener("click", () => {
  const was = closeDetail();
  const back = was && (was.kind === "path" ? $(`#map path.edge[data-path="${CSS.escape(was.id)}"]`)
                                          : $(`#map g.node[data-site="${CSS.escape(was.id)}"]`));
  if (back) back.focus();
});

function showBfd(status, since, detail) {
  const cls = stateClass(status);
  const b = $("#path-bfd");
  b.textContent = status || "unknown";
  b.className = `status bfd ${cls}`;
  b.dataset.state = cls;
  $("#path-bfd-since").textContent = since ? `since ${fmtTime(since)}${detail ? ` (${detail})` : ""}` : "";
}

async function openPath(id) {
  openDetail("path", id, `Path ${id}`);
  showBfd(state.pathStates.get(id), null, null);
  $("#path-latest").textContent = scoreText(map.scores.get(id));
  chart.set([]);
  const d = await gql(PATH_Q, { id, start: Date.now() / 1000 - HOUR }).catch((e) => { toast(e.message); return null; });
  if (!d || !state.selected || state.selected.id !== id) return;
  const p = d.path;
  if (!p) { $("#path-latest").textContent = "this path is not in the mesh"; return; }
  if (p.state) showBfd(state.pathStates.get(id) || p.state.status, p.state.since, p.state.detail || p.state.reason);
  const known = chart.points;   // live points that arrived while the history loaded
  const hist = p.history.items;
  const last = hist.length ? hist[hist.length - 1].ts : 0;
  chart.set([...hist, ...known.filter((x) => x.ts > last)]);
  if (p.latest) $("#path-latest").textContent = scoreText(p.latest);
}

async function loadAgents() {
  const d = await gql("query { agents { id site hostname status lastSeen revoked } }");
  state.agents = d.agents || [];
  if (state.selected && state.selected.kind === "site") renderSiteAgents(state.selected.id);
}

function renderSiteAgents(name) {
  const ul = $("#site-agents");
  ul.textContent = "";
  const mine = state.agents.filter((a) => a.site === name);
  if (!mine.length) ul.appendChild(h("li", { class: "muted" }, "No agent enrolled (Pending)."));
  for (const a of mine) {
    ul.appendChild(h("li", { "data-agent": a.id, "data-status": a.status },
      h("span", { class: `status ${a.status.toLowerCase()}` }, a.status), " ",
      a.hostname || a.id, " ",
      h("span", { class: "muted small" }, a.lastSeen ? `last contact ${fmtTime(a.lastSeen)}` : "never reported")));
  }
}

async function openSite(name) {
  const site = state.sites.find((s) => s.name === name);
  openDetail("site", name, `Site ${name}`);
  renderSiteAgents(name);
  const ul = $("#site-uplinks-list");
  ul.textContent = "";
  for (const u of site ? site.uplinks : []) {
    const paths = state.edges.filter((e) => (e.source === name && e.sourceUplink === u.name)
                                            || (e.target === name && e.targetUplink === u.name));
    const up = paths.filter((e) => stateClass(state.pathStates.get(e.id)) === "up").length;
    const down = paths.filter((e) => stateClass(state.pathStates.get(e.id)) === "down").length;
    ul.appendChild(h("li", { "data-uplink": u.name }, h("strong", {}, u.name), ` ${u.address} · `,
      `${paths.length} paths: ${up} up, ${down} down`));
  }
  const tb = $("#site-flows tbody");
  tb.textContent = "";
  tb.appendChild(h("tr", {}, h("td", { colspan: 3, class: "muted" }, "loading…")));
  await loadAgents().catch(() => {});
  const flows = await fetchFlows(name, null).catch(() => null);
  if (!state.selected || state.selected.id !== name) return;
  tb.textContent = "";
  const top = flows ? topFlows(flows).slice(0, 10) : [];
  if (!top.length) tb.appendChild(h("tr", {}, h("td", { colspan: 3, class: "muted" }, flows ? "No flows in the last hour." : "Flows unavailable.")));
  for (const f of top) {
    tb.appendChild(h("tr", {}, h("td", { "data-label": "Flow" }, flowText(f)),
      h("td", { "data-label": "Policy" }, f.policy || "–"), h("td", { "data-label": "Bytes" }, fmtBytes(f.bytes))));
  }
}

// -- flows -----------------------------------------------------------------------------------------

const FLOWS_Q = `query Flows($site: String, $policy: String, $start: Time, $after: String) {
  flows(site: $site, policy: $policy, start: $start, first: 1000, after: $after) {
    items { ts site src dst sport dport proto packets bytes firstNs policy path } nextCursor }
}`;

async function fetchFlows(site, policy, pages = 5) {
  const out = [];
  let after = null;
  for (let i = 0; i < pages; i++) {
    const d = await gql(FLOWS_Q, { site: site || null, policy: policy || null, start: Date.now() / 1000 - HOUR, after });
    out.push(...d.flows.items);
    after = d.flows.nextCursor;
    if (!after) break;
  }
  return out;
}

// each flow once (its latest snapshot: the counters grow), largest first
function topFlows(rows) {
  const by = new Map();
  for (const r of rows) {
    const k = [r.site, r.proto, r.src, r.sport, r.dst, r.dport, r.firstNs].join("|");
    const old = by.get(k);
    if (!old || r.ts >= old.ts) by.set(k, r);
  }
  return [...by.values()].sort((a, b) => num(b.bytes) - num(a.bytes));
}

function fillSelect(sel, values, all) {
  const keep = sel.value;
  sel.textContent = "";
  if (all !== null) sel.appendChild(h("option", { value: "" }, all));
  for (const v of values) sel.appendChild(h("option", { value: v }, v));
  if (values.includes(keep) || (all !== null && keep === "")) sel.value = keep;
}

async function loadFlows() {
  const f = $("#flows-filter");
  fillSelect(f.site, state.sites.map((s) => s.name), "all sites");
  fillSelect(f.policy, ordered(state.policies).map((p) => p.name), "all policies");
  const rows = await fetchFlows(f.site.value, f.policy.value);
  const flows = topFlows(rows);
  const totals = new Map();
  for (const x of flows) {
    const k = x.policy || "(no policy)";
    const t = totals.get(k) || { flows: 0, packets: 0, bytes: 0 };
    t.flows += 1; t.packets += num(x.packets); t.bytes += num(x.bytes);
    totals.set(k, t);
  }
  $("#flows-summary").textContent = `${flows.length} flows${f.site.value ? ` at ${f.site.value}` : ""}`
    + `${f.policy.value ? ` of policy ${f.policy.value}` : ""} in the last hour`;
  const tt = $("#flows-totals tbody");
  tt.textContent = "";
  if (!totals.size) tt.appendChild(h("tr", {}, h("td", { colspan: 4, class: "muted" }, "No flows.")));
  for (const [k, t] of [...totals].sort((a, b) => b[1].bytes - a[1].bytes)) {
    tt.appendChild(h("tr", { "data-policy": k }, h("th", { scope: "row", "data-label": "Policy" }, k),
      h("td", { "data-label": "Flows" }, t.flows), h("td", { "data-label": "Packets" }, t.packets),
      h("td", { "data-label": "Bytes" }, fmtBytes(t.bytes))));
  }
  const tb = $("#flows-top tbody");
  tb.textContent = "";
  if (!flows.length) tb.appendChild(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No flows.")));
  for (const x of flows.slice(0, 50)) {
    tb.appendChild(h("tr", { "data-site": x.site || "" }, h("td", { "data-label": "Site" }, x.site || "–"),
      h("td", { "data-label": "Flow" }, flowText(x)), h("td", { "data-label": "Policy" }, x.policy || "–"),
      h("td", { "data-label": "Packets" }, num(x.packets)), h("td", { "data-label": "Bytes" }, fmtBytes(x.bytes)),
      h("td", { "data-label": "Seen" }, fmtTime(x.ts))));
  }
}

$("#flows-filter").addEventListener("submit", (ev) => {
  ev.preventDefault();
  loadFlows().catch((e) => toast(e.message || String(e)));
});

// -- enrolment tokens ------------------------------------------------------------------------------

const TOKENS_Q = "query { tokens { id site createdBy created expires used usedBy revoked } }";

async function loadTokens() {
  const f = $("#token-form");
  fillSelect(f.site, state.sites.map((s) => s.name), null);
  const d = await gql(TOKENS_Q);
  const tb = $("#tokens-table tbody");
  tb.textContent = "";
  const list = (d.tokens || []).slice().sort((a, b) => b.created - a.created);
  if (!list.length) tb.appendChild(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No tokens.")));
  const now = Date.now() / 1000;
  for (const t of list) {
    const st = t.revoked ? "revoked" : t.used ? `used${t.usedBy ? ` by ${t.usedBy}` : ""}` : t.expires < now ? "expired" : "unused";
    tb.appendChild(h("tr", { "data-token": t.id, "data-state": st.split(" ")[0] },
      h("th", { scope: "row", "data-label": "Id" }, h("code", {}, t.id)),
      h("td", { "data-label": "Site" }, t.site),
      h("td", { "data-label": "Created" }, `${fmtTime(t.created)} by ${t.createdBy}`),
      h("td", { "data-label": "Expires" }, fmtTime(t.expires)),
      h("td", { "data-label": "State" }, st),
      h("td", { class: "actions" }, st === "unused"
        ? h("button", { type: "button", class: "delete", "aria-label": `Revoke token ${t.id}`, onclick: () => revokeToken(t) }, "Revoke")
        : null)));
  }
}

async function revokeToken(t) {
  if (!window.confirm(`Revoke the token ${t.id} of site ${t.site}?`)) return;
  try {
    await gql("mutation ($id: String!) { revokeToken(id: $id) }", { id: t.id });
    toast(`token ${t.id} revoked`);
  } catch (e) {
    toast(e.message);
  }
  await loadTokens().catch(() => {});
}

$("#token-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const f = ev.target;
  clearErrors(f);
  const ttl = f.ttl.value.trim();
  if (!/^\d+$/.test(ttl) || Number(ttl) < 1) {
    const slot = $('.field-error[data-for="ttl"]', f);
    slot.textContent = "minutes: a whole number, at least 1";
    f.ttl.setAttribute("aria-invalid", "true");
    f.ttl.focus();
    return;
  }
  try {
    const d = await gql(`mutation ($site: String!, $ttl: Float!) {
      createToken(site: $site, ttlS: $ttl) { token meta { id site expires } } }`, { site: f.site.value, ttl: Number(ttl) * 60 });
    $("#token-value").value = d.createToken.token;
    $("#token-new-site").textContent = d.createToken.meta.site;
    $("#token-new").hidden = false;
    $("#token-value").focus();
    $("#token-value").select();
    await loadTokens();
  } catch (e) {
    showError(f, e, (x) => (/site/i.test(String(x)) ? "site" : /ttl/i.test(String(x)) ? "ttl" : lastPart(x)));
  }
});

$("#token-copy").addEventListener("click", async () => {
  const v = $("#token-value");
  let ok = false;
  try {
    if (navigator.clipboard && window.isSecureContext) { await navigator.clipboard.writeText(v.value); ok = true; }
  } catch (e) { ok = false; }
  if (!ok) {
    v.select();
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
  }
  toast(ok ? "token copied" : "select the token and copy it (Ctrl+C)");
});

function forgetToken() {   // shown once: gone from the page when done, or when the view is left
  $("#token-value").value = "";
  $("#token-new").hidden = true;
}

$("#token-done").addEventListener("click", () => { forgetToken(); $("#token-site").focus(); });
window.addEventListener("hashchange", () => { if (!location.hash.startsWith("#/tokens")) forgetToken(); });

// -- audit -----------------------------------------------------------------------------------------

async function loadAudit() {
  const d = await gql("query { auditLog(first: 200) { id ts actor action target remote ok } }");
  const tb = $("#audit-table tbody");
  tb.textContent = "";
  for (const a of d.auditLog || []) {
    tb.appendChild(h("tr", { "data-id": a.id, class: a.ok ? "" : "failed" },
      h("td", { "data-label": "Time" }, fmtTime(a.ts)), h("td", { "data-label": "Who" }, a.actor),
      h("th", { scope: "row", "data-label": "Action" }, a.action), h("td", { "data-label": "Target" }, a.target),
      h("td", { "data-label": "From" }, a.remote || "–"),
      h("td", { "data-label": "Result" }, h("span", { class: `status ${a.ok ? "active" : "inactive"}` }, a.ok ? "ok" : "refused"))));
  }
}

window.addEventListener("hashchange", route);
showLogin();
