// The topology map: sites on a circle, each path a curve between its two
// sites (several uplink pairs between the same two sites fan out), coloured
// by state. Plain SVG, no library.

const NS = "http://www.w3.org/2000/svg";
const W = 600, H = 420;

function el(name, attrs = {}, parent = null) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}

export function stateClass(state) {
  const s = String(state || "").toLowerCase();
  if (s === "up") return "up";
  if (s === "down" || s === "admindown" || s === "admin_down") return "down";
  if (s === "damped") return "damped";
  return "unknown";
}

// the score hint: from a path's latest measurement, good / fair / poor (the
// edge's thickness) and the numbers in its tooltip
export function quality(m) {
  if (!m) return "none";
  const loss = m.lossPct ?? 0, rtt = m.rttMs ?? 0, mos = m.mos;
  if (loss >= 5 || rtt >= 250 || (mos !== null && mos !== undefined && mos < 3.1)) return "poor";
  if (loss >= 1 || rtt >= 120 || (mos !== null && mos !== undefined && mos < 3.8)) return "fair";
  return "good";
}

export function scoreText(m) {
  if (!m) return "no measurements";
  const f = (v, u, d = 1) => (v === null || v === undefined ? "–" : `${Number(v).toFixed(d)}${u}`);
  return `rtt ${f(m.rttMs, " ms")}, jitter ${f(m.jitterMs, " ms")}, loss ${f(m.lossPct, " %")}, MOS ${f(m.mos, "", 2)}`;
}

export class TopologyMap {
  constructor(svg, { onselect, onsite } = {}) {
    this.svg = svg;
    this.onselect = onselect || (() => {});
    this.onsite = onsite || (() => {});
    this.edges = new Map();   // path id -> <path>
    this.states = new Map();  // path id -> state
    this.scores = new Map();  // path id -> latest metric
    this.info = new Map();    // path id -> "a.isp1 ↔ b.isp1"
  }

  render(nodes, edges, states) {
    const svg = this.svg;
    for (const c of [...svg.childNodes]) if (c.nodeName !== "desc") svg.removeChild(c);
    this.edges.clear();
    for (const [k, v] of states) this.states.set(k, v);
    const n = nodes.length;
    const cx = W / 2, cy = H / 2;
    const r = n <= 1 ? 0 : Math.min(W, H) / 2 - 70;
    const pos = new Map();
    nodes.forEach((node, i) => {
      const a = -Math.PI / 2 + (2 * Math.PI * i) / Math.max(1, n);
      pos.set(node.id, { x: cx + r * Math.cos(a), y: cy + r * Math.sin(a) });
    });
    const gEdges = el("g", { class: "edges" }, svg);
    const gLabels = el("g", { class: "edge-labels" }, svg);
    const gNodes = el("g", { class: "nodes" }, svg);
    // fan out the parallel paths of a pair of sites
    const pairs = new Map();
    for (const e of edges) {
      const key = [e.source, e.target].sort().join("|");
      if (!pairs.has(key)) pairs.set(key, []);
      pairs.get(key).push(e);
    }
    for (const group of pairs.values()) {
      group.forEach((e, i) => {
        const a = pos.get(e.source), b = pos.get(e.target);
        if (!a || !b) return;
        const off = (i - (group.length - 1) / 2) * (group.length > 1 ? 62 : 0);
        const mx = (a.x + b.x) / 2, my = (a.y + b.y) / 2;
        const dx = b.x - a.x, dy = b.y - a.y;
        const len = Math.hypot(dx, dy) || 1;
        const qx = mx - (dy / len) * off * 2, qy = my + (dx / len) * off * 2;
        const p = el("path", {
          d: `M${a.x.toFixed(1)},${a.y.toFixed(1)} Q${qx.toFixed(1)},${qy.toFixed(1)} ${b.x.toFixed(1)},${b.y.toFixed(1)}`,
          class: `edge ${stateClass(this.states.get(e.id))} q-${quality(this.scores.get(e.id))}`,
          "data-path": e.id,
          "data-state": stateClass(this.states.get(e.id)),
          "data-quality": quality(this.scores.get(e.id)),
          tabindex: "0",
          role: "button",
          "aria-label": `path ${e.id}: ${stateClass(this.states.get(e.id))}`,
        }, gEdges);
        this.info.set(e.id, `${e.id} (${e.sourceUplink} ↔ ${e.targetUplink})`);
        el("title", {}, p);
        this.edges.set(e.id, p);
        this._label(e.id);
        if (edges.length <= 40) {   // the uplink pair at the curve's middle, while there is room for it
          const lx = (a.x + 2 * qx + b.x) / 4, ly = (a.y + 2 * qy + b.y) / 4;
          const lab = el("text", { x: lx.toFixed(1), y: (ly + 4).toFixed(1), "text-anchor": "middle",
                                   class: "edge-label", "aria-hidden": "true" }, gLabels);
          lab.textContent = `${e.sourceUplink}·${e.targetUplink}`;
        }
        p.addEventListener("click", () => this.onselect(e.id));
        p.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); this.onselect(e.id); } });
      });
    }
    for (const node of nodes) {
      const { x, y } = pos.get(node.id);
      const g = el("g", { class: `node ${String(node.status || "pending").toLowerCase()}`, "data-site": node.id,
                          transform: `translate(${x.toFixed(1)},${y.toFixed(1)})`, tabindex: "0", role: "button",
                          "aria-label": `site ${node.id}: ${node.status || "Pending"}` }, gNodes);
      g.addEventListener("click", () => this.onsite(node.id));
      g.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); this.onsite(node.id); } });
      el("circle", { r: 30 }, g);
      const label = el("text", { y: 5, "text-anchor": "middle" }, g);
      label.textContent = node.id.length > 8 ? `${node.id.slice(0, 7)}…` : node.id;
      const st = el("text", { y: 46, "text-anchor": "middle", class: "status" }, g);
      st.textContent = node.status || "Pending";
      const t = el("title", {}, g);
      t.textContent = `${node.id}: ${node.status || "Pending"}; uplinks ${node.uplinks.join(", ")}`;
    }
    if (n === 0) {
      const t = el("text", { x: cx, y: cy, "text-anchor": "middle", class: "empty" }, svg);
      t.textContent = "No sites yet";
    }
  }

  // class, state, quality, tooltip and label of one edge from what is known of it
  _label(pathId) {
    const p = this.edges.get(pathId);
    if (!p) return false;
    const cls = stateClass(this.states.get(pathId));
    const m = this.scores.get(pathId);
    const q = quality(m);
    p.setAttribute("class", `edge ${cls} q-${q}`);
    p.setAttribute("data-state", cls);
    p.setAttribute("data-quality", q);
    p.setAttribute("aria-label", `path ${pathId}: ${cls}, ${scoreText(m)}`);
    const t = p.querySelector("title");
    if (t) t.textContent = `${this.info.get(pathId) || pathId}: ${cls}; ${scoreText(m)}`;
    return true;
  }

  setState(pathId, state) {
    this.states.set(pathId, state);
    return this._label(pathId);
  }

  setScore(pathId, metric) {
    this.scores.set(pathId, metric);
    return this._label(pathId);
  }

  select(kind, id) {   // highlight the selected edge or node
    for (const e of this.svg.querySelectorAll(".selected")) e.classList.remove("selected");
    const e = kind === "path" ? this.edges.get(id) : this.svg.querySelector(`g.node[data-site="${CSS.escape(id || "")}"]`);
    if (e) e.classList.add("selected");
  }

  setSiteStatus(site, status) {
    const g = this.svg.querySelector(`g.node[data-site="${CSS.escape(site)}"]`);
    if (!g) return;
    g.setAttribute("class", `node ${String(status).toLowerCase()}`);
    const st = g.querySelector("text.status");
    if (st) st.textContent = String(status);
  }
}
