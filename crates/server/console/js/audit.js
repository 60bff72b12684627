// The audit trail: the caller's records filtered by time, pool, status, kind, identifier and
// execution id; one opened with its code, output, egress decisions and the rule that decided;
// and the hash chain verified by the server (GET /v1/audit/verify).

import * as api from "./api.js";
import { $, h, replace, fillKv, when, bytes } from "./dom.js";

let ctx;
let next = null;
let records = [];
/** Bumped by every search: the answer of a search overtaken by a newer one is dropped. */
let generation = 0;

export async function init(c) {
  ctx = c;
  $("aud-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    search().catch(ctx.alertError);
  });
  $("aud-more").addEventListener("click", () => search(next).catch(ctx.alertError));
  $("aud-verify").addEventListener("click", () => verify().catch(ctx.alertError));
}

export async function show(args = []) {
  const { pools } = await api.json("/v1/pools");
  const sel = $("aud-pool");
  const current = sel.value;
  replace(sel, h("option", { value: "", text: "any" }),
    ...pools.map((p) => h("option", { value: p.name, text: p.name })));
  sel.value = current;
  if (args[0]) {
    // #audit/<execution id>: that execution's record, opened.
    $("aud-execution").value = args[0];
    await search();
    const r = records.find((x) => x.execution === args[0]);
    if (r) open(r);
  } else if (!records.length) {
    await search();
  }
}

function millis(input) {
  const v = $(input).value;
  return v ? new Date(v).getTime() : undefined;
}

async function search(after) {
  const q = {
    pool: $("aud-pool").value,
    since: millis("aud-since"),
    until: millis("aud-until"),
    status: $("aud-status").value,
    kind: $("aud-kind").value,
    identifier: $("aud-identifier").value.trim(),
    execution: $("aud-execution").value.trim(),
    after,
    limit: 100,
  };
  const mine = ++generation;
  const page = await api.json(api.withQuery("/v1/audit", { ...q, after }));
  if (mine !== generation) return;
  if (after === undefined) {
    records = [];
    $("aud-detail").hidden = true;
  }
  records.push(...page.records);
  next = page.next ?? null;
  // Newest first.
  const rows = [...records].reverse().map(row);
  replace($("aud-table").tBodies[0], ...rows);
  $("aud-empty").hidden = rows.length > 0;
  $("aud-more").hidden = next === null;
}

function row(r) {
  const link = h("a", { href: "#", class: "mono", text: r.execution || `record ${r.seq}` });
  link.addEventListener("click", (ev) => {
    ev.preventDefault();
    open(r);
  });
  return h("tr", { "data-seq": r.seq },
    h("td", {}, link),
    h("td", { text: when(r.time_ms) }),
    h("td", { text: r.kind }),
    h("td", { text: r.pool }),
    h("td", { class: "mono", text: r.identifier || "" }),
    h("td", { text: r.status || "" }),
    h("td", { class: "mono", text: r.execution || "" }),
    h("td", { text: r.decided_by || "" }),
  );
}

function open(r) {
  replace($("aud-detail-h"), r.execution ? `Execution ${r.execution}` : `Record ${r.seq} (${r.kind})`);
  fillKv($("aud-detail-kv"), [
    ["Time", when(r.time_ms)],
    ["Kind", r.kind],
    ["Pool", r.pool],
    ["Session", r.session],
    ["Identifier", r.identifier],
    ["Language", r.language],
    ["Status", r.status],
    ["Decided by", r.decided_by],
    ["Duration", r.duration_ms != null ? `${Math.round(r.duration_ms)} ms` : null],
    ["CPU time", r.cpu_time_ms != null ? `${Math.round(r.cpu_time_ms)} ms` : null],
    ["Peak memory", r.peak_memory_bytes != null ? bytes(r.peak_memory_bytes) : null],
    ["Files", (r.files || []).join(", ")],
    ["Request id", r.request_id],
    ["Code SHA-256", r.code_sha256],
    ["Chain", `#${r.seq}, hash ${String(r.hash).slice(0, 16)}…, previous ${String(r.prev_hash).slice(0, 16)}…`],
  ]);
  replace($("aud-code"), r.code || "");
  replace($("aud-stdout"), r.stdout || "");
  replace($("aud-stderr"), r.stderr || "");
  const egress = (r.egress || []).map((e) =>
    h("tr", { class: e.allowed ? "allowed" : "blocked" },
      h("td", { class: "mono", text: e.host }),
      h("td", { text: e.port }),
      h("td", { text: e.protocol }),
      h("td", { text: e.allowed ? "allowed" : "blocked" }),
      h("td", { text: e.reason })));
  replace($("aud-egress").tBodies[0], ...egress);
  if (!egress.length) $("aud-egress").tBodies[0].append(h("tr", {}, h("td", { colspan: 5, text: "no network attempts" })));
  $("aud-detail").hidden = false;
  $("aud-detail-h").setAttribute("tabindex", "-1");
  $("aud-detail-h").focus();
}

async function verify() {
  const out = $("aud-verify-result");
  replace(out, "Verifying…");
  const v = await api.json("/v1/audit/verify");
  replace(out, v.ok
    ? `Chain intact: ${v.checked} records checked.`
    : `Chain BROKEN after ${v.checked} records: ${v.broken}`);
  out.className = v.ok ? "status ok" : "status bad";
}
