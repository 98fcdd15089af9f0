// A path's metric history as four stacked SVG line charts sharing one time
// axis: latency, jitter, loss and MOS. Plain SVG, no library; redrawn whole
// when a point arrives (a few hundred points: cheap).

const NS = "http://www.w3.org/2000/svg";
const W = 400, ROW = 64, PAD_L = 40, PAD_R = 8, TOP = 8, GAP = 12, AXIS = 18;   // about 1:1 in the side panel

export const SERIES = [
  { key: "rttMs", label: "Latency", unit: "ms", cls: "s-rtt" },
  { key: "jitterMs", label: "Jitter", unit: "ms", cls: "s-jitter" },
  { key: "lossPct", label: "Loss", unit: "%", cls: "s-loss" },
  { key: "mos", label: "MOS", unit: "", cls: "s-mos", min: 1, max: 5 },
];

function el(name, attrs = {}, parent = null, text = null) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== null) e.textContent = text;
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(v, unit) {
  if (v === null || v === undefined) return "–";
  const s = Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 10 ? v.toFixed(1) : v.toFixed(2);
  return unit ? `${s} ${unit}` : s;
}

function clock(ts) {
  const d = new Date(ts * 1000);
  const p = (n) => String(n).padStart(2, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export class MetricChart {
  constructor(svg) {
    this.svg = svg;
    this.points = [];
    this.max = 2000;   // points kept
  }

  set(points) {
    this.points = points.slice().sort((a, b) => a.ts - b.ts).slice(-this.max);
    this.draw();
  }

  add(p) {
    this.points.push(p);
    if (this.points.length > 1 && this.points[this.points.length - 2].ts > p.ts) this.points.sort((a, b) => a.ts - b.ts);
    if (this.points.length > this.max) this.points.splice(0, this.points.length - this.max);
    this.draw();
  }

  draw() {
    const svg = this.svg;
    for (const c of [...svg.childNodes]) if (c.nodeName !== "desc" && c.nodeName !== "title") svg.removeChild(c);
    const H = TOP + SERIES.length * (ROW + GAP) + AXIS;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("data-points", String(this.points.length));
    const pts = this.points;
    if (!pts.length) {
      el("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, svg, "No measurements yet");
      return;
    }
    const t0 = pts[0].ts, t1 = Math.max(pts[pts.length - 1].ts, t0 + 1);
    const x = (ts) => PAD_L + ((ts - t0) / (t1 - t0)) * (W - PAD_L - PAD_R);
    SERIES.forEach((s, i) => {
      const y0 = TOP + i * (ROW + GAP);
      const g = el("g", { class: `series ${s.cls}`, "data-series": s.key }, svg);
      const vals = pts.filter((p) => p[s.key] !== null && p[s.key] !== undefined);
      let lo = s.min !== undefined ? s.min : 0;
      let hi = s.max !== undefined ? s.max : Math.max(...vals.map((p) => p[s.key]), 0);
      if (s.max === undefined) hi = hi <= 0 ? 1 : hi * 1.15;
      const y = (v) => y0 + ROW - ((Math.min(Math.max(v, lo), hi) - lo) / (hi - lo)) * ROW;
      el("rect", { x: PAD_L, y: y0, width: W - PAD_L - PAD_R, height: ROW, class: "plot" }, g);
      for (const f of [0, 0.5, 1]) {
        const v = lo + (hi - lo) * f;
        el("line", { x1: PAD_L, x2: W - PAD_R, y1: y(v).toFixed(1), y2: y(v).toFixed(1), class: "grid" }, g);
        el("text", { x: PAD_L - 6, y: (y(v) + 4).toFixed(1), "text-anchor": "end", class: "tick" }, g, fmt(v, ""));
      }
      const last = vals.length ? vals[vals.length - 1][s.key] : null;
      el("text", { x: PAD_L + 6, y: y0 + 13, class: "series-label" }, g, `${s.label}${s.unit ? ` (${s.unit})` : ""}: ${fmt(last, s.unit)}`);
      if (!vals.length) return;
      const d = vals.map((p, k) => `${k ? "L" : "M"}${x(p.ts).toFixed(1)},${y(p[s.key]).toFixed(1)}`).join(" ");
      el("path", { d, class: "line" }, g);
      if (vals.length <= 120) {
        for (const p of vals) {
          const c = el("circle", { cx: x(p.ts).toFixed(1), cy: y(p[s.key]).toFixed(1), r: 2.5, class: "point" }, g);
          el("title", {}, c, `${clock(p.ts)} ${s.label} ${fmt(p[s.key], s.unit)}`);
        }
      }
    });
    const yAxis = TOP + SERIES.length * (ROW + GAP) + 4;
    el("text", { x: PAD_L, y: yAxis + 10, class: "tick" }, svg, clock(t0));
    el("text", { x: W - PAD_R, y: yAxis + 10, "text-anchor": "end", class: "tick" }, svg, clock(t1));
  }
}
