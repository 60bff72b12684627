// Small SVG charts built with createElementNS (no markup, no inline style: colours come from
// classes in console.css). A chart is a set of series over the same buckets.

const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, text) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

/**
 * A line chart: `labels` (one per bucket), `series` [{ name, values }], `unit` for the
 * accessible summary. Answers a <figure> with the SVG, a legend and a text summary.
 */
export function lineChart({ title, labels, series, unit = "" }) {
  const W = 640, H = 200, L = 44, B = 22, T = 8, R = 8;
  const max = Math.max(1, ...series.flatMap((s) => s.values.filter(Number.isFinite)));
  const x = (i) => L + (labels.length <= 1 ? 0 : (i * (W - L - R)) / (labels.length - 1));
  const y = (v) => T + (H - T - B) * (1 - v / max);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title, class: "chart-svg" });
  for (const f of [0, 0.5, 1]) {
    svg.append(el("line", { x1: L, x2: W - R, y1: y(max * f), y2: y(max * f), class: "grid" }));
    svg.append(el("text", { x: L - 4, y: y(max * f) + 4, class: "axis", "text-anchor": "end" }, fmt(max * f)));
  }
  const step = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((l, i) => {
    if (i % step === 0) svg.append(el("text", { x: x(i), y: H - 6, class: "axis", "text-anchor": "middle" }, l));
  });
  series.forEach((s, k) => {
    const pts = s.values.map((v, i) => (Number.isFinite(v) ? `${x(i)},${y(v)}` : null)).filter(Boolean);
    if (pts.length) svg.append(el("polyline", { points: pts.join(" "), class: `series s${k % 6}` }));
    s.values.forEach((v, i) => {
      if (Number.isFinite(v) && v > 0) svg.append(el("circle", { cx: x(i), cy: y(v), r: 2.5, class: `dot s${k % 6}` }));
    });
  });
  const fig = document.createElement("figure");
  fig.className = "chart-fig";
  fig.append(svg);
  const legend = document.createElement("ul");
  legend.className = "legend";
  series.forEach((s, k) => {
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = `swatch s${k % 6}`;
    const total = s.values.filter(Number.isFinite);
    li.append(sw, `${s.name}: ${total.length ? fmt(s.summary ?? total.reduce((a, b) => a + b, 0)) : "–"}${unit}`);
    legend.append(li);
  });
  if (!series.length) {
    const li = document.createElement("li");
    li.textContent = "no data in this period";
    legend.append(li);
  }
  fig.append(legend);
  return fig;
}

function fmt(v) {
  if (!Number.isFinite(v)) return "";
  if (v >= 100 || Number.isInteger(v)) return String(Math.round(v));
  return v.toFixed(1);
}

/** Prometheus text format → [{ name, labels, value }]. */
export function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    if (m[3]) {
      for (const lm of m[3].matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[lm[1]] = lm[2].replace(/\\"/g, '"').replace(/\\n/g, "\n").replace(/\\\\/g, "\\");
      }
    }
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}
