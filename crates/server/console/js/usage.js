// Usage and health: the caller's executions and latency per pool over the last 24 hours
// (from its audit records), its metered usage (/v1/usage), and the pools' warm stock, zygotes
// and counters (/v1/pools and /metrics, limited to the pools this key may use).

import * as api from "./api.js";
import { $, h, replace, fillKv, bytes } from "./dom.js";
import { lineChart, parseMetrics } from "./charts.js";

let ctx;
const HOUR = 3600_000;

export async function init(c) {
  ctx = c;
  $("use-refresh").addEventListener("click", () => show().catch(ctx.alertError));
}

export async function show() {
  const now = Date.now();
  const since = now - 24 * HOUR;
  const [usage, { pools }, metricsText, executions, refusals] = await Promise.all([
    api.json(api.withQuery("/v1/usage", { since })).catch(() => null),
    api.json("/v1/pools"),
    api.request("/metrics").then((r) => r.text()).catch(() => ""),
    records({ kind: "execution", since }),
    records({ kind: "refused", since }),
  ]);
  fillKv($("use-totals"), usage ? [
    ["Tenant", usage.tenant],
    ["Executions", usage.executions],
    ["Execution time", `${usage.execution_seconds.toFixed(1)} s`],
    ["CPU time", `${usage.cpu_seconds.toFixed(1)} s`],
    ["Highest peak memory", bytes(usage.peak_memory_bytes)],
    ["Sessions created", usage.sessions_created],
  ] : [["Usage", "this server keeps no audit log"]]);

  // Hourly buckets, oldest first, per pool.
  const first = Math.floor(since / HOUR) * HOUR;
  const n = Math.ceil((now - first) / HOUR);
  const labels = Array.from({ length: n }, (_, i) => `${new Date(first + i * HOUR).getHours()}h`);
  const byPool = new Map();
  for (const r of executions) {
    const i = Math.floor((r.time_ms - first) / HOUR);
    if (i < 0 || i >= n) continue;
    if (!byPool.has(r.pool)) byPool.set(r.pool, { count: new Array(n).fill(0), ms: new Array(n).fill(0) });
    const b = byPool.get(r.pool);
    b.count[i]++;
    b.ms[i] += r.duration_ms || 0;
  }
  const names = [...byPool.keys()].sort();
  replace($("use-exec-chart"), lineChart({
    title: "Executions per pool, by hour, last 24 hours",
    labels,
    series: names.map((p) => ({ name: p, values: byPool.get(p).count })),
  }));
  replace($("use-lat-chart"), lineChart({
    title: "Mean execution latency per pool in milliseconds, by hour, last 24 hours",
    labels,
    unit: " ms mean",
    series: names.map((p) => {
      const b = byPool.get(p);
      const values = b.count.map((c, i) => (c ? b.ms[i] / c : NaN));
      const total = b.count.reduce((a, x) => a + x, 0);
      return { name: p, values, summary: total ? b.ms.reduce((a, x) => a + x, 0) / total : NaN };
    }),
  }));

  const metrics = parseMetrics(metricsText);
  const metric = (name, labels) => metrics
    .filter((m) => m.name === name && Object.entries(labels).every(([k, v]) => m.labels[k] === v))
    .reduce((a, m) => a + m.value, 0);
  const has = (name, labels) => metrics.some((m) => m.name === name && m.labels.pool === labels.pool);
  replace($("use-pools").tBodies[0], ...pools.map((p) => {
    const count = metric("ampoule_execution_duration_seconds_count", { pool: p.name });
    const sum = metric("ampoule_execution_duration_seconds_sum", { pool: p.name });
    const zygote = !has("ampoule_zygote_up", { pool: p.name })
      ? "none"
      : metric("ampoule_zygote_up", { pool: p.name }) > 0
        ? `up (${metric("ampoule_zygotes", { pool: p.name })} running, ${metric("ampoule_zygote_forks_total", { pool: p.name })} forks)`
        : "down";
    return h("tr", {},
      h("td", { text: p.name }),
      h("td", { text: p.language }),
      h("td", { text: `${p.ready} / ${p.warm}` }),
      h("td", { text: p.busy }),
      h("td", { text: `${p.sessions} / ${p.max_sessions}` }),
      h("td", { text: zygote }),
      h("td", { text: metricsText ? metric("ampoule_executions_total", { pool: p.name }) : "" }),
      h("td", { text: count ? `${Math.round((sum / count) * 1000)} ms` : "" }),
    );
  }));

  const reasons = new Map();
  for (const r of refusals) reasons.set(r.decided_by || "unknown", (reasons.get(r.decided_by || "unknown") || 0) + 1);
  replace($("use-refused"), ...[...reasons].map(([k, v]) => h("li", { text: `${k}: ${v}` })));
  if (!reasons.size) $("use-refused").append(h("li", { text: "no refusals in the last 24 hours" }));
}

/** The caller's audit records matching `q`, up to 5000. */
async function records(q) {
  const out = [];
  let after;
  for (let i = 0; i < 5; i++) {
    let page;
    try {
      page = await api.json(api.withQuery("/v1/audit", { ...q, after, limit: 1000 }));
    } catch (err) {
      if (err instanceof api.ApiError && err.status === 404) return out;
      throw err;
    }
    out.push(...page.records);
    if (page.next == null) break;
    after = page.next;
  }
  return out;
}
