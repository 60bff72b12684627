// The playground: pick a pool (its language follows), edit code, run it in a session of that
// pool and watch its output arrive; upload files to the session and download what it wrote.

import * as api from "./api.js";
import { $, h, replace, fillKv, bytes } from "./dom.js";
import { Editor } from "./editor.js";
import * as render from "./render.js";

const SAMPLES = {
  python: "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()\n",
  javascript: "console.log([1, 2, 3].map((x) => x * 2))\n",
  shell: "uname -a\nls -la /mnt/data\n",
};

let ctx;
let editor;
let pools = [];
/** The session the playground runs in, per pool. */
const sessionOf = new Map();
let running = false;

export async function init(c) {
  ctx = c;
  editor = new Editor($("pg-editor"), {
    label: "Code",
    labelledBy: "pg-code-label",
    doc: SAMPLES.python,
    onRun: run,
  });
  $("pg-pool").addEventListener("change", onPool);
  $("pg-language").addEventListener("change", onLanguage);
  $("pg-run").addEventListener("click", run);
  $("pg-new-session").addEventListener("click", () => {
    sessionOf.delete(pool());
    showSession();
    replace($("pg-files"));
  });
  $("pg-upload").addEventListener("change", upload);
}

export async function show() {
  const body = await api.json("/v1/pools");
  pools = body.pools;
  const current = pool();
  const sel = $("pg-pool");
  replace(sel, ...pools.map((p) => h("option", { value: p.name, text: `${p.name} (${p.language})` })));
  if (current && pools.some((p) => p.name === current)) sel.value = current;
  const langs = [...new Set(pools.map((p) => p.language))];
  const lsel = $("pg-language");
  replace(lsel, ...langs.map((l) => h("option", { value: l, text: l })));
  onPool();
}

function pool() {
  return $("pg-pool").value;
}

function poolInfo() {
  return pools.find((p) => p.name === pool());
}

function onPool() {
  const p = poolInfo();
  if (!p) return;
  const previous = $("pg-language").value;
  $("pg-language").value = p.language;
  editor.setLanguage(p.language);
  if (previous !== p.language && editor.text.trim() === (SAMPLES[previous] || "").trim()) {
    editor.text = SAMPLES[p.language] || "";
  }
  showSession();
  refreshFiles();
}

function onLanguage() {
  // A language picks the first pool that runs it.
  const lang = $("pg-language").value;
  const p = pools.find((x) => x.language === lang);
  if (p) {
    $("pg-pool").value = p.name;
    onPool();
  }
}

function showSession() {
  const s = sessionOf.get(pool());
  replace($("pg-session"), s ? s.id : "none yet (made on first run)");
}

async function session() {
  const have = sessionOf.get(pool());
  if (have) return have;
  const identifier = `console-${crypto.randomUUID()}`;
  const s = await api.json("/v1/sessions", { method: "POST", json: { pool: pool(), identifier } });
  sessionOf.set(pool(), s);
  showSession();
  return s;
}

function status(text) {
  replace($("pg-status"), text);
}

async function run() {
  if (running) return;
  running = true;
  const button = $("pg-run");
  button.disabled = true;
  const out = $("pg-output");
  out.replaceChildren();
  $("pg-result").replaceChildren();
  ctx.alertError(null);
  let result = null;
  let executionId = null;
  let displays = 0;
  try {
    status("Starting a session…");
    let s = await session();
    status("Running…");
    const onEvent = (ev) => {
      executionId = ev.execution_id || executionId;
      switch (ev.type) {
        case "stdout":
        case "stderr":
          appendText(out, ev.text, ev.type);
          break;
        case "display":
          displays++;
          out.append(render.bundle(ev.data));
          break;
        case "result":
          result = ev.result;
          break;
        case "error":
          throw new api.ApiError(0, ev.error.code, ev.error.message);
        default:
          break;
      }
    };
    try {
      await api.executeStream(s.id, editor.text, onEvent);
    } catch (err) {
      // The session was deleted (the sessions page, another client) or expired: a new one.
      if (!(err instanceof api.ApiError && err.code === "session_not_found")) throw err;
      forget();
      s = await session();
      await api.executeStream(s.id, editor.text, onEvent);
    }
    if (result) {
      if (displays === 0) for (const o of result.outputs || []) out.append(render.bundle(o));
      if (result.result) out.append(render.bundle(result.result));
      if (result.error) out.append(render.traceback(result.error));
      showResult(result, executionId);
      status(`Finished: ${result.status}`);
    }
    await refreshFiles();
  } catch (err) {
    status("Failed");
    ctx.alertError(err);
  } finally {
    running = false;
    button.disabled = false;
  }
}

/** Adds streamed text, joining runs of the same stream into one block. */
function appendText(out, text, stream) {
  const last = out.lastElementChild;
  if (last && last.tagName === "PRE" && last.dataset.stream === stream) {
    last.append(text);
  } else {
    const pre = render.textBlock(text, stream);
    pre.dataset.stream = stream;
    out.append(pre);
  }
}

function showResult(r, executionId) {
  const audit = executionId
    ? h("a", { href: `#audit/${encodeURIComponent(executionId)}`, class: "mono", text: executionId })
    : null;
  fillKv($("pg-result"), [
    ["Status", r.status],
    ["Execution id", audit],
    ["Duration", `${Math.round(r.duration_ms)} ms`],
    ["CPU time", r.cpu_time_ms != null ? `${Math.round(r.cpu_time_ms)} ms` : null],
    ["Peak memory", r.peak_memory_bytes != null ? bytes(r.peak_memory_bytes) : null],
    ["Limit reached", r.limit],
    ["Exit code", r.exit_code],
    ["Output truncated", r.stdout_truncated || r.stderr_truncated ? "yes" : null],
  ]);
}

async function refreshFiles() {
  const s = sessionOf.get(pool());
  const list = $("pg-files");
  if (!s) return list.replaceChildren();
  try {
    const { files } = await api.json(`/v1/sessions/${encodeURIComponent(s.id)}/files`);
    replace(list, ...files.map((f) => fileItem(s.id, f, ctx.alertError)));
    if (!files.length) list.append(h("li", { text: "no files" }));
  } catch (err) {
    if (err instanceof api.ApiError && err.code === "session_not_found") forget();
    else ctx.alertError(err);
  }
}

/** Forgets the pool's session (gone: deleted elsewhere, or expired). */
function forget() {
  sessionOf.delete(pool());
  showSession();
  $("pg-files").replaceChildren();
}

export function fileItem(sessionId, f, onError) {
  const button = h("button", { type: "button", text: "Download", "aria-label": `Download ${f.path}` });
  button.addEventListener("click", () => api.download(sessionId, f.path).catch(onError));
  return h("li", {}, h("span", { class: "mono", text: f.path }), ` ${bytes(f.size)} `, button);
}

async function upload() {
  const input = $("pg-upload");
  const file = input.files && input.files[0];
  if (!file) return;
  ctx.alertError(null);
  try {
    const s = await session();
    const form = new FormData();
    form.append("file", file, file.name);
    await api.request(`/v1/sessions/${encodeURIComponent(s.id)}/files`, { method: "POST", body: form });
    status(`Uploaded ${file.name} to /mnt/data/${file.name}`);
    input.value = "";
    await refreshFiles();
  } catch (err) {
    ctx.alertError(err);
  }
}
