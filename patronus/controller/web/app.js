// The dashboard's page logic: login (with TOTP), the topology map and the
// failover timeline (live over GraphQL subscriptions), sites and policies
// with create / edit / delete, the server's validation errors next to
// the field they name. Role-aware: a viewer gets no edit controls (and the
// server refuses its writes anyway).

import { ApiError, Live, Session } from "./api.js";
import { TopologyMap } from "./map.js";

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

const session = new Session();
const live = new Live(session);
const state = { me: null, sites: [], policies: [], events: [], pathStates: new Map(), edges: [], nodes: [] };
const map = new TopologyMap($("#map"), { onselect: (id) => toast(`path ${id}: ${state.pathStates.get(id) || "unknown"}`) });
const TIMELINE_MAX = 200;

const OVERVIEW = `query Overview {
  me { name role kind }
  sites { name subnets uplinks { name address } etag status }
  policies { name priority app action prefer etag
             match { src dst srcPorts dstPorts proto dscp } }
  topology { nodes { id uplinks } edgeCount
             edges(first: 1000) { items { id source target sourceUplink targetUplink } nextCursor } }
  paths { id state { status reason since } }
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
  for (const p of d.paths || []) {
    if (p.state && !state.pathStates.has(p.id)) state.pathStates.set(p.id, p.state.status);
    else if (!state.pathStates.has(p.id)) state.pathStates.set(p.id, "unknown");
  }
  state.events = (d.events || []).slice().sort((a, b) => b.ts - a.ts);
  renderMap(topo.edgeCount);
  renderSites();
  renderPolicies();
  renderTimeline();
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
    const down = state.edges.filter((e) => map.states.get(e.id) === "down" || map.states.get(e.id) === "admin_down").length;
    $("#map-summary").textContent = $("#map-summary").textContent.replace(/\d+ down$/, `${down} down`);
  });
  live.subscribe("subscription { failoverMoves { ts site reason policy toSite fromPath toPath detail received } }", {},
    (d) => {
      const m = d.failoverMoves;
      prependEvent({ ts: m.ts, site: m.site, policy: m.policy, fromPath: m.fromPath, toPath: m.toPath,
                     reason: m.reason, detail: m.detail });
    });
  live.subscribe("subscription { siteStatus { site status previous } }", {}, (d) => {
    const s = d.siteStatus;
    const site = state.sites.find((x) => x.name === s.site);
    if (site) site.status = s.status;
    const node = state.nodes.find((x) => x.id === s.site);
    if (node) node.status = s.status;
    map.setSiteStatus(s.site, s.status);
    renderSites();
  });
  let pending = null;
  live.subscribe("subscription { policyChanges { type target } }", {}, () => {
    clearTimeout(pending);
    pending = setTimeout(() => reload().catch(() => {}), 150);
  });
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
  if (!list.length) tb.appendChild(h("tr", {}, h("td", { colspan: 7, class: "muted" }, "No policies yet.")));
  list.forEach((p, i) => {
    tb.appendChild(h("tr", { "data-policy": p.name },
      h("td", { "data-label": "#" }, i + 1),
      h("td", { "data-label": "Priority" }, p.priority),
      h("th", { scope: "row", "data-label": "Name" }, p.name),
      h("td", { "data-label": "Match" }, matchText(p.match)),
      h("td", { "data-label": "App" }, p.app),
      h("td", { "data-label": "Action" }, p.action === "drop" ? "drop" : (p.prefer.length ? `prefer ${p.prefer.join(", ")}` : "forward")),
      canWrite() ? h("td", { class: "actions" },
        h("button", { type: "button", class: "edit", "aria-label": `Edit policy ${p.name}`, onclick: () => editPolicy(p) }, "Edit"),
        h("button", { type: "button", class: "delete", "aria-label": `Delete policy ${p.name}`, onclick: () => deletePolicy(p) }, "Delete"))
        : null));
  });
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
  const view = $$(".view").find((v) => v.dataset.view === name) ? name : "map";
  for (const v of $$(".view")) v.hidden = v.dataset.view !== view;
  for (const a of $$("#nav a")) {
    if (a.dataset.view === view) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

window.addEventListener("hashchange", route);
showLogin();
