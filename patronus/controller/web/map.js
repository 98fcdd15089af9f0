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

export class TopologyMap {
  constructor(svg, { onselect } = {}) {
    this.svg = svg;
    this.onselect = onselect || (() => {});
    this.edges = new Map();   // path id -> <path>
    this.states = new Map();  // path id -> state
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
          class: `edge ${stateClass(this.states.get(e.id))}`,
          "data-path": e.id,
          "data-state": stateClass(this.states.get(e.id)),
          tabindex: "0",
          role: "button",
          "aria-label": `path ${e.id}: ${stateClass(this.states.get(e.id))}`,
        }, gEdges);
        const t = el("title", {}, p);
        t.textContent = `${e.id} (${e.sourceUplink} ↔ ${e.targetUplink}): ${stateClass(this.states.get(e.id))}`;
        if (edges.length <= 40) {   // the uplink pair at the curve's middle, while there is room for it
          const lx = (a.x + 2 * qx + b.x) / 4, ly = (a.y + 2 * qy + b.y) / 4;
          const lab = el("text", { x: lx.toFixed(1), y: (ly + 4).toFixed(1), "text-anchor": "middle",
                                   class: "edge-label", "aria-hidden": "true" }, gLabels);
          lab.textContent = `${e.sourceUplink}·${e.targetUplink}`;
        }
        p.addEventListener("click", () => this.onselect(e.id));
        p.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); this.onselect(e.id); } });
        this.edges.set(e.id, p);
      });
    }
    for (const node of nodes) {
      const { x, y } = pos.get(node.id);
      const g = el("g", { class: `node ${String(node.status || "pending").toLowerCase()}`, "data-site": node.id,
                          transform: `translate(${x.toFixed(1)},${y.toFixed(1)})` }, gNodes);
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

  setState(pathId, state) {
    this.states.set(pathId, state);
    const p = this.edges.get(pathId);
    if (!p) return false;
    const cls = stateClass(state);
    p.setAttribute("class", `edge ${cls}`);
    p.setAttribute("data-state", cls);
    p.setAttribute("aria-label", `path ${pathId}: ${cls}`);
    const t = p.querySelector("title");
    if (t) t.textContent = t.textContent.replace(/: [a-z]+$/, `: ${cls}`);
    return true;
  }

  setSiteStatus(site, status) {
    const g = this.svg.querySelector(`g.node[data-site="${CSS.escape(site)}"]`);
    if (!g) return;
    g.setAttribute("class", `node ${String(status).toLowerCase()}`);
    const st = g.querySelector("text.status");
    if (st) st.textContent = String(status);
  }
}
