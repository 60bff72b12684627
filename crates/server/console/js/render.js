// How output of sandboxed code enters the page: as text, always, except PNG and JPEG images,
// which are checked (base64 alphabet, the format's magic bytes, a size cap) and shown through
// an <img> with a data: URL, where no script can run. HTML, SVG, Markdown and anything else
// is shown as its source text, labelled with its media type.

import { h } from "./dom.js";

const MAX_IMAGE_BASE64 = 16 * 1024 * 1024;
const MAGIC = {
  "image/png": [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a],
  "image/jpeg": [0xff, 0xd8, 0xff],
};

/** A data: URL for a base64 PNG or JPEG, or null when it is not one. */
export function imageUrl(mime, b64) {
  const magic = MAGIC[mime];
  if (!magic || typeof b64 !== "string") return null;
  const clean = b64.replace(/\s+/g, "");
  if (clean.length === 0 || clean.length > MAX_IMAGE_BASE64) return null;
  if (!/^[A-Za-z0-9+/]+={0,2}$/.test(clean)) return null;
  let head;
  try {
    head = atob(clean.slice(0, 16));
  } catch {
    return null;
  }
  for (let i = 0; i < magic.length; i++) {
    if (head.charCodeAt(i) !== magic[i]) return null;
  }
  return `data:${mime};base64,${clean}`;
}

/** A block of plain text (stdout, stderr, a traceback). */
export function textBlock(text, cls) {
  return h("pre", { class: cls, text });
}

/** One rich output (a MIME bundle) as an image or as text. */
export function bundle(data) {
  const wrap = h("figure", { class: "display" });
  if (!data || typeof data !== "object") {
    wrap.append(textBlock(String(data), "plain"));
    return wrap;
  }
  for (const mime of ["image/png", "image/jpeg"]) {
    if (mime in data) {
      const url = imageUrl(mime, data[mime]);
      if (url) {
        const alt = typeof data["text/plain"] === "string" ? data["text/plain"] : `${mime} output`;
        wrap.append(h("img", { src: url, alt, class: "plot" }));
        return wrap;
      }
    }
  }
  if (typeof data["text/plain"] === "string" && !("text/html" in data)) {
    wrap.append(textBlock(data["text/plain"], "plain"));
    return wrap;
  }
  // Anything else, HTML included: its source, as text, with its media type.
  const mime = ["text/html", "image/svg+xml", "text/markdown", "application/json", "text/latex"]
    .find((m) => m in data) || Object.keys(data)[0];
  if (mime === undefined) return wrap;
  const value = data[mime];
  wrap.append(
    h("figcaption", { text: `${mime} (shown as text)` }),
    textBlock(typeof value === "string" ? value : JSON.stringify(value, null, 2), "plain"),
  );
  return wrap;
}

/** An execution's error: its name, message and traceback, as text. */
export function traceback(err) {
  const lines = [`${err.name}: ${err.value}`];
  if (Array.isArray(err.traceback) && err.traceback.length) lines.unshift(...err.traceback);
  // Interpreters colour tracebacks with ANSI escapes; show the words, not the codes.
  return textBlock(lines.join("\n").replace(/\x1b\[[0-9;]*m/g, ""), "traceback");
}
