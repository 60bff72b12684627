// The console's shell: sign-in, the page switcher (the URL's fragment: #playground,
// #sessions, #audit, #usage; never the key), and the alert every page reports errors to.

import * as api from "./api.js";
import { $, replace } from "./dom.js";
import * as playground from "./playground.js";
import * as sessions from "./sessions.js";
import * as audit from "./audit.js";
import * as usage from "./usage.js";

const pages = { playground, sessions, audit, usage };
const inited = new Set();

/** Shows an error (or clears it with null) in the page's alert region. */
export function alertError(err) {
  const box = $("alert");
  if (!err) {
    box.hidden = true;
    box.replaceChildren();
    return;
  }
  const msg = err instanceof api.ApiError ? `${err.message} (${err.code})` : String(err.message || err);
  replace(box, msg);
  box.hidden = false;
}

function showSignIn(message) {
  for (const el of document.querySelectorAll(".page")) el.hidden = el.id !== "page-signin";
  $("nav").hidden = true;
  $("who").hidden = true;
  const e = $("signin-error");
  e.hidden = !message;
  replace(e, message || "");
  document.title = "Sign in · ampoule console";
  $("api-key").focus();
}

async function route() {
  alertError(null);
  if (!api.key()) return showSignIn();
  const [name, ...rest] = (location.hash.slice(1) || "playground").split("/");
  const page = pages[name] ? name : "playground";
  for (const el of document.querySelectorAll(".page")) el.hidden = el.id !== `page-${page}`;
  for (const a of document.querySelectorAll("#nav a")) {
    if (a.dataset.page === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  $("nav").hidden = false;
  $("who").hidden = false;
  document.title = `${$(`page-${page}`).querySelector("h1").textContent} · ampoule console`;
  try {
    if (!inited.has(page)) {
      inited.add(page);
      await pages[page].init({ alertError });
    }
    await pages[page].show(rest.map(decodeURIComponent));
  } catch (err) {
    alertError(err);
  }
}

async function signIn(ev) {
  ev.preventDefault();
  const input = $("api-key");
  const k = input.value.trim();
  if (!k) return showSignIn("Type an API key.");
  try {
    // Any call with the key tells whether the server knows it.
    await api.json("/v1/pools", { withKey: k });
  } catch (err) {
    const msg = err instanceof api.ApiError && err.status === 401
      ? `The server refused this API key: ${err.message}`
      : `Could not sign in: ${err.message}`;
    return showSignIn(msg);
  }
  input.value = "";
  api.setKey(k);
  $("signin-error").hidden = true;
  await showTenant();
  route();
  $("main").focus();
}

async function showTenant() {
  try {
    const u = await api.json("/v1/usage");
    replace($("tenant"), `tenant ${u.tenant}`);
  } catch {
    replace($("tenant"), "signed in");
  }
}

function signOut() {
  api.forgetKey();
  inited.clear();
  location.hash = "";
  location.reload();
}

api.whenUnauthorized(() => {
  api.forgetKey();
  showSignIn("The server no longer accepts this API key; sign in again.");
});

$("signin-form").addEventListener("submit", signIn);
$("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", route);
if (api.key()) showTenant();
route();
