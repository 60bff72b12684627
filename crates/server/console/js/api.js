// The /v1 API from the browser. The key lives in sessionStorage (this tab only, gone when it
// closes), is sent in the Authorization header to this origin only, and is never put in a
// URL or a cookie.

const KEY = "ampoule.apiKey";

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

export function key() {
  return sessionStorage.getItem(KEY);
}

export function setKey(k) {
  sessionStorage.setItem(KEY, k);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY);
}

/** Listeners told when the server refuses the key (401): the page signs out. */
const onUnauthorized = [];
export function whenUnauthorized(f) {
  onUnauthorized.push(f);
}

async function errorOf(resp) {
  let code = "http_" + resp.status;
  let message = `${resp.status} ${resp.statusText}`;
  try {
    const body = await resp.json();
    if (body && body.error) {
      code = String(body.error.code || code);
      message = String(body.error.message || message);
    }
  } catch {
    // not JSON: keep the status line
  }
  const err = new ApiError(resp.status, code, message);
  if (resp.status === 401) for (const f of onUnauthorized) f(err);
  return err;
}

/** A request with the key; answers the Response, or throws an ApiError. */
export async function request(path, { method = "GET", body, headers = {}, withKey } = {}) {
  const k = withKey ?? key();
  if (!k) throw new ApiError(401, "unauthorized", "sign in with an API key first");
  const resp = await fetch(path, {
    method,
    body,
    headers: { ...headers, Authorization: `Bearer ${k}` },
    credentials: "omit",
    cache: "no-store",
    redirect: "error",
    referrerPolicy: "no-referrer",
  });
  if (!resp.ok) throw await errorOf(resp);
  return resp;
}

/** GET or send JSON, answer JSON (or null for 204). */
export async function json(path, opts = {}) {
  const o = { ...opts };
  if (o.json !== undefined) {
    o.body = JSON.stringify(o.json);
    o.headers = { ...(o.headers || {}), "Content-Type": "application/json" };
  }
  const resp = await request(path, o);
  if (resp.status === 204) return null;
  return resp.json();
}

/** `/v1/...?a=b` from parameters, leaving out empty ones. */
export function withQuery(path, params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) {
    if (v !== undefined && v !== null && v !== "") q.set(k, String(v));
  }
  const s = q.toString();
  return s ? `${path}?${s}` : path;
}

/** Runs code with the streaming form (NDJSON), calling `onEvent` for each line. */
export async function executeStream(sessionId, code, onEvent) {
  const resp = await request(`/v1/sessions/${encodeURIComponent(sessionId)}/executions/stream`, {
    method: "POST",
    body: JSON.stringify({ code }),
    headers: { "Content-Type": "application/json", Accept: "application/x-ndjson" },
  });
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (value) buf += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = buf.slice(0, nl).trim();
      buf = buf.slice(nl + 1);
      if (line) onEvent(JSON.parse(line));
    }
    if (done) break;
  }
  if (buf.trim()) onEvent(JSON.parse(buf));
}

/** Path of a session file for the files API (each segment encoded). */
export function filePath(sessionId, path) {
  const segs = path.split("/").filter(Boolean).map(encodeURIComponent).join("/");
  return `/v1/sessions/${encodeURIComponent(sessionId)}/files/${segs}`;
}

/** Saves a session file to the user's disk (fetched with the key, handed over as a blob). */
export async function download(sessionId, path) {
  const resp = await request(filePath(sessionId, path) + "/content");
  const blob = await resp.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = path.split("/").pop() || "file";
  a.rel = "noopener";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
