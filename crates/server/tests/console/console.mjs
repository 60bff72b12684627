// Drives the web console in Debian's chromium (playwright-core, executablePath = the system
// browser) against a real `ampoule serve`, as crates/server/tests/console.rs sets it up:
// CONSOLE_URL, KEY_A and KEY_B (two tenants), CHROMIUM, SHOTS (the screenshot directory).
// Every step asserts; the first failure exits non-zero with what was on the page.

import { chromium } from "playwright-core";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

const URL_ = process.env.CONSOLE_URL;
const KEY_A = process.env.KEY_A;
const KEY_B = process.env.KEY_B;
const SHOTS = process.env.SHOTS;
const started = Date.now();

function log(msg) {
  console.log(`[${((Date.now() - started) / 1000).toFixed(1)} s] ${msg}`);
}

function assert(cond, msg) {
  if (!cond) throw new Error(`assertion failed: ${msg}`);
}

async function api(method, path, key, body) {
  const resp = await fetch(URL_ + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
  const text = await resp.text();
  return { status: resp.status, body: text ? JSON.parse(text) : null };
}

const shots = [];
async function shot(page, name) {
  const path = join(SHOTS, `${name}.png`);
  await page.screenshot({ path, fullPage: true });
  shots.push(path);
}

// Tenant B's session, execution and identifier: none of them may ever show for tenant A.
log("tenant b runs code through the API");
const bSession = await api("POST", "/v1/sessions", KEY_B, { pool: "python", identifier: "tenant-b-secret-name" });
assert(bSession.status === 201, `tenant b's session: ${JSON.stringify(bSession)}`);
const bExec = await api("POST", `/v1/sessions/${bSession.body.id}/executions`, KEY_B, { code: "print('tenant b secret output')" });
assert(bExec.status === 200 && bExec.body.status === "succeeded", `tenant b's execution: ${JSON.stringify(bExec)}`);
const B_SECRETS = [bSession.body.id, bExec.body.execution_id, "tenant-b-secret-name", "tenant b secret output"];

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, acceptDownloads: true });
const page = await context.newPage();
const problems = [];
const cspViolations = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => {
  const t = m.text();
  if (/Content Security Policy/i.test(t)) cspViolations.push(t);
  else if (m.type() === "error" && !/Failed to load resource/.test(t)) problems.push(`console error: ${t}`);
});
const requested = [];
page.on("request", (r) => requested.push(r.url()));
page.on("dialog", (d) => d.accept());

try {
  // -- no key: the sign-in form, and nothing else, on every page -------------------------
  log("without a key");
  const first = await page.goto(`${URL_}/console`);
  const csp = first.headers()["content-security-policy"] || "";
  assert(csp.includes("script-src 'self'") && !csp.includes("unsafe-inline"), `CSP: ${csp}`);
  await page.getByLabel("API key").waitFor();
  for (const hash of ["#playground", "#sessions", "#audit", "#usage"]) {
    await page.goto(`${URL_}/console${hash}`);
    await page.getByLabel("API key").waitFor();
    assert(await page.locator("#page-signin").isVisible(), `sign-in shown at ${hash}`);
    for (const p of ["playground", "sessions", "audit", "usage"]) {
      assert(!(await page.locator(`#page-${p}`).isVisible()), `${p} hidden without a key at ${hash}`);
    }
    assert(!(await page.locator("#nav").isVisible()), "no navigation without a key");
  }
  // The page refuses inline script (the CSP is enforced, not just sent).
  const inline = await page.evaluate(() => {
    const s = document.createElement("script");
    s.textContent = "window.__inlineRan = true";
    document.body.append(s);
    return window.__inlineRan === true;
  });
  assert(!inline, "an inline script ran");
  cspViolations.length = 0; // that refusal was the one expected
  await shot(page, "01-sign-in");

  // -- a wrong key: a clear error ---------------------------------------------------------
  log("a wrong key");
  await page.getByLabel("API key").fill("definitely-not-a-key");
  await page.getByRole("button", { name: "Sign in" }).click();
  const err = page.locator("#signin-error");
  await err.waitFor({ state: "visible" });
  const errText = await err.textContent();
  assert(/refused this API key/.test(errText), `wrong-key message: ${errText}`);
  assert(!(await page.locator("#nav").isVisible()), "a wrong key opened the console");
  assert(await page.evaluate(() => sessionStorage.length === 0), "a wrong key was kept");
  await shot(page, "02-wrong-key");

  // -- sign in, by keyboard ---------------------------------------------------------------
  log("sign in");
  await page.getByLabel("API key").fill(KEY_A);
  await page.getByLabel("API key").press("Enter");
  await page.locator("#nav").waitFor({ state: "visible" });
  // Signed in where the user was (the last page asked for was #usage).
  await page.getByRole("heading", { name: "Usage and health" }).waitFor();
  await page.getByRole("link", { name: "Playground" }).click();
  await page.getByRole("heading", { name: "Playground" }).waitFor();
  await page.locator("#tenant", { hasText: "tenant a" }).waitFor();
  assert(await page.evaluate(() => document.cookie === ""), "a cookie was set");

  // -- playground: a chart ----------------------------------------------------------------
  log("playground: matplotlib");
  const pg = page.locator("#page-playground");
  const aud = page.locator("#page-audit");
  await pg.getByLabel("Pool", { exact: true }).selectOption("python");
  assert((await pg.getByLabel("Language", { exact: true }).inputValue()) === "python", "language follows the pool");
  async function runCode(code) {
    const editor = page.getByRole("textbox", { name: "Code" });
    await editor.click();
    await page.keyboard.press("Control+A");
    await page.keyboard.press("Delete");
    await page.keyboard.insertText(code);
    const text = await page.locator(".cm-content").evaluate((e) => e.innerText);
    assert(text.trim() === code.trim(), `the editor holds ${JSON.stringify(text)}`);
    await page.getByRole("button", { name: "Run", exact: true }).click();
    await page.locator("#pg-status", { hasText: /Finished|Failed/ }).waitFor({ timeout: 120_000 });
    const status = await page.locator("#pg-status").textContent();
    assert(status.startsWith("Finished"), `run: ${status}; alert: ${await page.locator("#alert").textContent()}`);
  }
  await runCode("import matplotlib.pyplot as plt; plt.plot([1,2,3]); plt.show()");
  const img = page.getByRole("log", { name: "Output" }).locator("img.plot");
  await img.waitFor({ state: "visible" });
  const dims = await img.evaluate((i) => [i.naturalWidth, i.naturalHeight, i.src.slice(0, 22)]);
  assert(dims[0] > 100 && dims[1] > 100 && dims[2] === "data:image/png;base64,", `the chart: ${dims}`);
  const resultText = await page.locator("#pg-result").textContent();
  assert(resultText.includes("succeeded"), `result: ${resultText}`);
  const chartExec = (await page.locator("#pg-result a").textContent()).trim();
  assert(/^exe_/.test(chartExec), `execution id: ${chartExec}`);
  const sessionId = (await page.locator("#pg-session").textContent()).trim();
  assert(/^ses_/.test(sessionId), `session id: ${sessionId}`);
  await shot(page, "03-playground-chart");

  // -- upload a CSV, read it from code, download it back ----------------------------------
  log("playground: a CSV");
  const csv = "a,b\n1,10\n2,20\n3,12\n";
  await pg.getByLabel("Upload a file").setInputFiles({ name: "numbers.csv", mimeType: "text/csv", buffer: Buffer.from(csv) });
  await page.locator("#pg-status", { hasText: "Uploaded numbers.csv" }).waitFor();
  await page.locator("#pg-files", { hasText: "numbers.csv" }).waitFor();
  await runCode("import pandas as pd\ndf = pd.read_csv('/mnt/data/numbers.csv')\nprint('sum of b =', df['b'].sum())");
  await page.getByRole("log", { name: "Output" }).getByText("sum of b = 42").waitFor();
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.getByRole("button", { name: "Download numbers.csv" }).click(),
  ]);
  const saved = join(SHOTS, "downloaded-numbers.csv");
  await download.saveAs(saved);
  const { readFileSync } = await import("node:fs");
  assert(readFileSync(saved, "utf8") === csv, "the downloaded file is the uploaded one");
  await shot(page, "04-playground-csv");

  // -- hostile output: text, never markup -------------------------------------------------
  log("playground: hostile output");
  await page.evaluate(() => { window.__pwned = 0; });
  await runCode([
    "print('<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>')",
    "class H:",
    "    def _repr_html_(self):",
    "        return '<img src=x onerror=\"window.__pwned=3\"><script>window.__pwned=4</script><b>bold</b>'",
    "display(H())",
    "H()",
  ].join("\n"));
  const out = page.getByRole("log", { name: "Output" });
  await out.getByText("text/html (shown as text)").first().waitFor();
  const outText = await out.textContent();
  assert(outText.includes('<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'), "stdout shown as text");
  assert(outText.includes('<img src=x onerror="window.__pwned=3"><script>window.__pwned=4</script><b>bold</b>'), "the HTML shown as text");
  assert((await out.locator("img").count()) === 0, "no <img> made from output");
  assert((await out.locator("script, b, iframe").count()) === 0, "no element made from output");
  await page.waitForTimeout(300);
  assert((await page.evaluate(() => window.__pwned)) === 0, "script from output ran");
  assert((await page.locator("figcaption", { hasText: "text/html (shown as text)" }).count()) === 2, "display and result both shown as text");
  await shot(page, "05-playground-hostile-output");

  // -- audit: find the chart's execution by its id ----------------------------------------
  log("audit");
  await page.getByRole("link", { name: "Audit" }).click();
  await page.getByRole("heading", { name: "Audit", exact: true }).waitFor();
  await aud.getByLabel("Execution id").fill(chartExec);
  await page.getByRole("button", { name: "Search" }).click();
  const rows = page.locator("#aud-table tbody tr");
  // The page's first search (everything) may still be answering: wait for the filtered one.
  await page.waitForFunction((id) => {
    const trs = document.querySelectorAll("#aud-table tbody tr");
    return trs.length === 1 && trs[0].textContent.includes(id);
  }, chartExec, { timeout: 10_000 }).catch(() => {});
  assert((await rows.count()) === 1, `one record for ${chartExec}: ${await rows.count()}`);
  assert((await rows.first().textContent()).includes(chartExec), "the record is the chart's");
  await rows.first().getByRole("link").click();
  await page.locator("#aud-detail").waitFor({ state: "visible" });
  assert((await page.locator("#aud-code").textContent()).includes("plt.plot([1,2,3])"), "the record's code");
  assert((await page.locator("#aud-detail-kv").textContent()).includes("succeeded"), "the record's status");
  await page.getByRole("button", { name: "Verify chain" }).click();
  await page.locator("#aud-verify-result", { hasText: "Chain intact" }).waitFor();
  // A filter: failed executions of this tenant (none), then all of them.
  await aud.getByLabel("Execution id").fill("");
  await aud.getByLabel("Status", { exact: true }).selectOption("failed");
  await page.getByRole("button", { name: "Search" }).click();
  await page.locator("#aud-empty").waitFor({ state: "visible" });
  await aud.getByLabel("Status", { exact: true }).selectOption("");
  await aud.getByLabel("Pool", { exact: true }).selectOption("python");
  await page.getByRole("button", { name: "Search" }).click();
  await rows.first().waitFor();
  const auditText = await page.locator("#aud-table").textContent();
  assert(auditText.includes(chartExec), "the unfiltered list has the chart's execution");
  for (const s of B_SECRETS) assert(!auditText.includes(s), `tenant b's ${s} in tenant a's audit`);
  // B's execution id, asked for by name, finds nothing.
  await aud.getByLabel("Execution id").fill(bExec.body.execution_id);
  await page.getByRole("button", { name: "Search" }).click();
  await page.locator("#aud-empty").waitFor({ state: "visible" });
  await aud.getByLabel("Execution id").fill(chartExec);
  await page.getByRole("button", { name: "Search" }).click();
  await rows.first().getByRole("link").click();
  await shot(page, "06-audit");

  // -- sessions: the playground's session, opened, then deleted ---------------------------
  log("sessions");
  await page.getByRole("link", { name: "Sessions" }).click();
  await page.getByRole("heading", { name: "Sessions and sandboxes" }).waitFor();
  const row = page.locator(`#ses-table tr[data-id="${sessionId}"]`);
  await row.waitFor();
  const rowText = await row.textContent();
  assert(/running/.test(rowText) && /python/.test(rowText), `the row: ${rowText}`);
  const sessionsText = await page.locator("#ses-table").textContent();
  for (const s of B_SECRETS) assert(!sessionsText.includes(s), `tenant b's ${s} in tenant a's sessions`);
  await page.getByRole("button", { name: `Open ${sessionId}` }).click();
  await page.locator("#ses-files", { hasText: "numbers.csv" }).waitFor();
  await page.locator("#ses-execs", { hasText: chartExec }).waitFor();
  await shot(page, "07-sessions");
  await page.getByRole("button", { name: `Delete ${sessionId}` }).click();
  await row.waitFor({ state: "detached" });
  const gone = await api("GET", `/v1/sessions/${sessionId}`, KEY_A);
  assert(gone.status === 404, `the session after delete: ${gone.status}`);
  const bStill = await api("GET", `/v1/sessions/${bSession.body.id}`, KEY_B);
  assert(bStill.status === 200, "tenant b's session is untouched");
  // The playground notices its session is gone and runs in a new one.
  await page.getByRole("link", { name: "Playground" }).click();
  await runCode("print('in a new session')");
  await page.getByRole("log", { name: "Output" }).getByText("in a new session").waitFor();
  const newSession = (await page.locator("#pg-session").textContent()).trim();
  assert(/^ses_/.test(newSession) && newSession !== sessionId, `a new session: ${newSession}`);
  assert(!(await page.locator("#alert").isVisible()), "no error for the deleted session");

  // -- usage and health -------------------------------------------------------------------
  log("usage");
  await page.getByRole("link", { name: "Usage" }).click();
  await page.getByRole("heading", { name: "Usage and health" }).waitFor();
  await page.locator("#use-pools tbody tr", { hasText: "python" }).waitFor();
  await page.locator("#use-exec-chart svg polyline").first().waitFor({ state: "attached" });
  const legend = await page.locator("#use-exec-chart .legend").textContent();
  assert(/python: [4-9]/.test(legend), `executions per pool: ${legend}`);
  const totals = await page.locator("#use-totals").textContent();
  assert(/Tenanta/.test(totals.replace(/\s+/g, "")), `usage totals: ${totals}`);
  await shot(page, "08-usage");

  // -- keyboard: the navigation is reachable and works with Tab and Enter -----------------
  log("keyboard");
  await page.locator("body").press("Home");
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  let reached = false;
  for (let i = 0; i < 12 && !reached; i++) {
    await page.keyboard.press("Tab");
    reached = await page.evaluate(() => document.activeElement?.textContent === "Playground");
  }
  assert(reached, "Tab reaches the navigation");
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Playground" }).waitFor();

  // -- a narrow window --------------------------------------------------------------------
  log("narrow window");
  await page.setViewportSize({ width: 375, height: 800 });
  for (const [hash, name] of [["#playground", "09-narrow-playground"], ["#audit", "10-narrow-audit"]]) {
    await page.goto(`${URL_}/console${hash}`);
    await page.locator(`#page-${hash.slice(1)}`).waitFor({ state: "visible" });
    assert(!(await page.locator("#alert").isVisible()), `an error on ${hash}: ${await page.locator("#alert").textContent()}`);
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert(overflow <= 1, `${hash} is ${overflow} px wider than a 375 px window`);
    await shot(page, name);
  }

  // -- sign out: the key is gone ----------------------------------------------------------
  log("sign out");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByLabel("API key").waitFor();
  assert(await page.evaluate(() => sessionStorage.length === 0), "the key outlived sign-out");
  await page.goto(`${URL_}/console#sessions`);
  assert(await page.locator("#page-signin").isVisible(), "sessions without a key after sign-out");

  for (const u of requested) {
    assert(!u.includes(KEY_A) && !u.includes(KEY_B), `a key in a URL: ${u}`);
    assert(u.startsWith(URL_) || u.startsWith("data:") || u.startsWith("blob:"), `a request to another origin: ${u}`);
  }
  assert(cspViolations.length === 0, `CSP violations: ${cspViolations.join("\n")}`);
  assert(problems.length === 0, `page errors: ${problems.join("\n")}`);
  log("passed");
} catch (e) {
  await shot(page, "failure").catch(() => {});
  const alert = await page.locator("#alert").textContent().catch(() => "");
  console.error(`FAILED: ${e.stack || e}\nalert: ${alert}\nproblems: ${problems.join("\n")}\nCSP: ${cspViolations.join("\n")}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  writeFileSync(join(SHOTS, "index.txt"), shots.join("\n") + "\n");
  for (const s of shots) console.log(`screenshot: ${s}`);
}
