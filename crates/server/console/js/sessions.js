// Sessions and sandboxes: the caller's list (state, age, idle time, memory and CPU limits),
// one opened with its files and recent executions, and deletion.

import * as api from "./api.js";
import { $, h, replace, duration, bytes, when } from "./dom.js";
import { fileItem } from "./playground.js";

let ctx;

export async function init(c) {
  ctx = c;
  $("ses-refresh").addEventListener("click", () => show().catch(ctx.alertError));
}

export async function show(args = []) {
  const [{ sandboxes }, { sessions }] = await Promise.all([
    api.json("/v1/sandboxes"),
    api.json("/v1/sessions"),
  ]);
  const byId = new Map(sessions.map((s) => [s.id, s]));
  const now = Date.now();
  // Grouped by pool, oldest first within a pool.
  sandboxes.sort((a, b) => a.pool.localeCompare(b.pool) || a.created_at.localeCompare(b.created_at));
  const rows = sandboxes.map((sb) => {
    const s = byId.get(sb.id);
    const lastUsed = s ? Date.parse(s.last_used_at) : NaN;
    const open = h("button", { type: "button", text: "Open", "aria-label": `Open ${sb.id}` });
    open.addEventListener("click", () => detail(sb).catch(ctx.alertError));
    const del = h("button", { type: "button", class: "danger", text: "Delete", "aria-label": `Delete ${sb.id}` });
    del.addEventListener("click", () => remove(sb).catch(ctx.alertError));
    return h("tr", { "data-id": sb.id },
      h("td", { class: "mono", text: sb.id }),
      h("td", { text: sb.pool }),
      h("td", { class: "mono", text: sb.identifier }),
      h("td", { text: sb.state + (s && s.busy ? " (busy)" : "") }),
      h("td", { text: duration(now - Date.parse(sb.created_at)), title: when(sb.created_at) }),
      h("td", { text: s ? duration(now - lastUsed) : "" }),
      h("td", { text: bytes(sb.memory_bytes) }),
      h("td", { text: `${sb.cpus} CPU` }),
      h("td", { text: s ? s.executions : "" }),
      h("td", { class: "actions" }, open, " ", del),
    );
  });
  replace($("ses-table").tBodies[0], ...rows);
  $("ses-empty").hidden = rows.length > 0;
  const opened = args[0] && sandboxes.find((sb) => sb.id === args[0]);
  if (opened) await detail(opened);
  else if (!sandboxes.some((sb) => sb.id === $("ses-detail").dataset.id)) $("ses-detail").hidden = true;
}

async function detail(sb) {
  const box = $("ses-detail");
  box.dataset.id = sb.id;
  replace($("ses-detail-h"), `${sb.kind === "session" ? "Session" : "Sandbox"} ${sb.id}`);
  const filesPath = sb.kind === "session" ? "sessions" : "sandboxes";
  const [{ files }, audit] = await Promise.all([
    api.json(`/v1/${filesPath}/${encodeURIComponent(sb.id)}/files`),
    api.json(api.withQuery("/v1/audit", { session: sb.id, kind: "execution" }))
      .catch(() => ({ records: [] })),
  ]);
  replace($("ses-files"), ...files.map((f) => fileItem(sb.id, f, ctx.alertError)));
  if (!files.length) $("ses-files").append(h("li", { text: "no files" }));
  const recent = audit.records.slice(-20).reverse();
  replace($("ses-execs"), ...recent.map((r) =>
    h("li", {},
      h("a", { href: `#audit/${encodeURIComponent(r.execution || "")}`, class: "mono", text: r.execution || `#${r.seq}` }),
      ` ${when(r.time_ms)} · ${r.status || ""} · ${Math.round(r.duration_ms || 0)} ms`,
      r.cpu_time_ms != null ? ` · CPU ${Math.round(r.cpu_time_ms)} ms` : "",
      r.peak_memory_bytes != null ? ` · peak ${bytes(r.peak_memory_bytes)}` : "",
      " · ",
      h("code", { text: firstLine(r.code) }))));
  if (!recent.length) $("ses-execs").append(h("li", { text: "no executions" }));
  box.hidden = false;
}

function firstLine(code) {
  const line = (code || "").split("\n")[0];
  return line.length > 80 ? line.slice(0, 80) + "…" : line;
}

async function remove(sb) {
  if (!window.confirm(`Delete ${sb.id} and everything in it?`)) return;
  const path = sb.kind === "session" ? "sessions" : "sandboxes";
  await api.json(`/v1/${path}/${encodeURIComponent(sb.id)}`, { method: "DELETE" });
  if ($("ses-detail").dataset.id === sb.id) $("ses-detail").hidden = true;
  await show();
  const first = document.querySelector("#ses-table button");
  (first || $("ses-refresh")).focus();
}
