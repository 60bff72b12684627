"""Contexts, processes, ports and tenants through the real E2B SDK, against `ampoule serve`
(crates/server/tests/e2b.rs), with E2B_API_URL, E2B_SANDBOX_URL (both the server's root URL)
and E2B_API_KEY (tenant A's key) set, and E2B_API_KEY_B: a key of another tenant.

What a user does with the SDK: two contexts of different languages share the sandbox's files; a
background process keeps running between run_code calls; stdin, kill, exit codes, errors,
streaming callbacks, shell and magic lines, environment variables. Then tenant B, with
everything of its own (API key, its sandbox's access and traffic tokens), aims at tenant A's
sandbox, processes, contexts and port: each answers "not found"; a port without its traffic
token is refused. Those attacks are raw HTTP (the SDK would never send them), as a hostile
tenant would send them.

One line per check; the first failure ends the script with a non-zero status and its reason.
"""

import json
import os
import struct
import sys
import time
import traceback
import uuid

import requests
from e2b import CommandExitException, NotFoundException
from e2b_code_interpreter import Sandbox

RUN = uuid.uuid4().hex[:12]
ROOT = os.environ["E2B_SANDBOX_URL"].rstrip("/")
KEY_B = os.environ["E2B_API_KEY_B"]
ENVD_PORT = 49983
JUPYTER_PORT = 49999


def check(name, fn):
    try:
        detail = fn()
    except Exception as e:  # noqa: BLE001 - every failure is reported the same way
        print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        sys.exit(1)
    print(f"ok   {name}" + (f" ({detail})" if detail else ""), flush=True)


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def stdout_of(ex):
    expect(ex.error is None, f"error: {ex.error}")
    return "".join(ex.logs.stdout)


def raising(exc, fn):
    """Calls fn and answers the exception of type `exc` it raised."""
    try:
        got = fn()
    except exc as e:
        return e
    raise AssertionError(f"no {exc.__name__}; answered {got!r}")


a = None
b = None
ctx_js = None


def create():
    global a
    a = Sandbox.create(
        metadata={"suite": "sandbox-py", "run": RUN},
        envs={"AMPOULE_E2B_GREETING": "hello-envs"},
    )
    return a.sandbox_id


def envs_at_create():
    r = a.commands.run("echo $AMPOULE_E2B_GREETING")
    expect(r.stdout == "hello-envs\n", f"stdout {r.stdout!r}")
    r = a.commands.run("echo $ONLY_HERE", envs={"ONLY_HERE": "per-command"})
    expect(r.stdout == "per-command\n", f"stdout {r.stdout!r}")


def two_languages():
    global ctx_js
    ctx_js = a.create_code_context(language="javascript")
    expect(ctx_js.id and ctx_js.language == "javascript", f"context {ctx_js!r}")
    ex = a.run_code(
        "require('fs').writeFileSync('/mnt/data/from_js.txt', 'written by ' + 'javascript')",
        context=ctx_js,
    )
    expect(ex.error is None, f"javascript error: {ex.error}")
    out = stdout_of(a.run_code("print(open('/mnt/data/from_js.txt').read())"))
    expect(out == "written by javascript\n", f"python read {out!r}")
    ids = [c.id for c in a.list_code_contexts()]
    expect(ctx_js.id in ids, f"{ctx_js.id} not in list_code_contexts() {ids}")
    return f"javascript context {ctx_js.id}"


def python_context_state():
    ctx = a.create_code_context(language="python")
    a.run_code("shared = 'default context'")
    a.run_code("shared = 'second context'", context=ctx)
    out = stdout_of(a.run_code("print(shared)"))
    expect(out == "default context\n", f"default context sees {out!r}")
    out = stdout_of(a.run_code("print(shared)", context=ctx))
    expect(out == "second context\n", f"second context sees {out!r}")
    a.remove_code_context(ctx)
    ids = [c.id for c in a.list_code_contexts()]
    expect(ctx.id not in ids, "removed context still listed")


def background_process():
    counter = a.commands.run(
        "i=0; while true; do i=$((i+1)); echo $i > /mnt/data/counter; sleep 0.2; done",
        background=True,
    )
    time.sleep(1.5)
    first = int(stdout_of(a.run_code("print(open('/mnt/data/counter').read())")))
    time.sleep(1.5)
    second = int(stdout_of(a.run_code("print(open('/mnt/data/counter').read())")))
    expect(second > first > 0, f"counter {first} then {second}")
    sleeper = a.commands.run("sleep 30", background=True)
    procs = {p.pid: p for p in a.commands.list()}
    expect(counter.pid in procs, f"counter {counter.pid} not in commands.list() {procs}")
    expect(sleeper.pid in procs, f"sleep {sleeper.pid} not in commands.list()")
    expect("sleep 30" in " ".join([procs[sleeper.pid].cmd] + procs[sleeper.pid].args), f"{procs[sleeper.pid]!r}")
    expect(a.commands.kill(counter.pid), "kill(counter) answered False")
    expect(a.commands.kill(sleeper.pid), "kill(sleep) answered False")
    return f"counter {first} -> {second}"


def stdin_cat():
    cat = a.commands.run("cat", background=True, stdin=True)
    a.commands.send_stdin(cat.pid, "hello cat\n")
    cat.send_stdin("second line\n")
    a.commands.close_stdin(cat.pid)
    r = cat.wait()
    expect(r.exit_code == 0, f"exit {r.exit_code}")
    expect(r.stdout == "hello cat\nsecond line\n", f"stdout {r.stdout!r}")


def kill_process():
    h = a.commands.run("sleep 300", background=True)
    expect(h.pid in [p.pid for p in a.commands.list()], "not listed")
    expect(a.commands.kill(h.pid), "kill answered False")
    e = raising(CommandExitException, h.wait)
    expect(e.exit_code != 0, f"exit {e.exit_code}")
    expect(h.pid not in [p.pid for p in a.commands.list()], "listed after kill")
    expect(a.commands.kill(h.pid) is False, "a second kill found it")
    return f"exit {e.exit_code} {e.error or ''}".strip()


def nonzero_exit():
    e = raising(CommandExitException, lambda: a.commands.run("echo out; echo err >&2; exit 3"))
    expect(e.exit_code == 3, f"exit {e.exit_code}")
    expect(e.stdout == "out\n" and e.stderr == "err\n", f"{e.stdout!r} {e.stderr!r}")


def run_code_error():
    a.run_code("kept = 'before the error'")
    ex = a.run_code("def f():\n    return 1 / 0\nf()")
    expect(ex.error is not None, "no error")
    expect(ex.error.name == "ZeroDivisionError", f"name {ex.error.name!r}")
    expect("division by zero" in ex.error.value, f"value {ex.error.value!r}")
    expect("ZeroDivisionError" in ex.error.traceback and "f()" in ex.error.traceback, f"traceback {ex.error.traceback!r}")
    # The state survives the error.
    expect(stdout_of(a.run_code("print(kept)")) == "before the error\n", "state lost")


def callbacks():
    out, err, results = [], [], []
    ex = a.run_code(
        "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')\n'done'",
        on_stdout=out.append,
        on_stderr=err.append,
        on_result=results.append,
    )
    expect(ex.error is None, f"error {ex.error}")
    expect("".join(m.line for m in out) == "a\nc\n", f"on_stdout {out!r}")
    expect("".join(m.line for m in err) == "b\n", f"on_stderr {err!r}")
    expect([r.text for r in results] == ["'done'"], f"on_result {results!r}")
    chunks = []
    a.commands.run("echo x; sleep 0.3; echo y", on_stdout=chunks.append)
    expect("".join(chunks) == "x\ny\n", f"commands on_stdout {chunks!r}")


def shell_and_magic():
    out = stdout_of(a.run_code("!echo hi"))
    expect("hi" in out.split(), f"!echo hi -> {out!r}")
    out = stdout_of(a.run_code("%pip list"))
    expect("Package" in out and "Version" in out, f"%pip list -> {out[:300]!r}")


def port_request(sbx_id, host, token=None, extra=None):
    headers = {"Host": host}
    if token:
        headers["e2b-traffic-access-token"] = token
    headers.update(extra or {})
    return requests.get(f"{ROOT}/secret.txt", headers=headers, timeout=30)


def port_needs_token():
    a.files.write("/mnt/data/secret.txt", "tenant a's secret\n")
    a.commands.run("python -m http.server 8001", background=True, cwd="/mnt/data")
    expect(a.traffic_access_token, "the sandbox has no traffic access token")
    host = a.get_host(8001)
    deadline, last = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        last = port_request(a.sandbox_id, host, a.traffic_access_token)
        if last.status_code == 200:
            break
        time.sleep(0.5)
    expect(last.status_code == 200 and last.text == "tenant a's secret\n", f"with its token: {last.status_code} {last.text[:200]!r}")
    r = port_request(a.sandbox_id, host)
    expect(r.status_code in (401, 403, 404, 502) and "secret" not in r.text, f"without a token: {r.status_code} {r.text[:200]!r}")
    r = port_request(a.sandbox_id, host, "not-the-token")
    expect(r.status_code in (401, 403, 404, 502) and "secret" not in r.text, f"a wrong token: {r.status_code} {r.text[:200]!r}")
    return f"without a token {r.status_code}"


def tenant_b_sdk():
    global b
    b = Sandbox.create(api_key=KEY_B, metadata={"suite": "sandbox-py-b", "run": RUN})
    ids = []
    paginator = Sandbox.list(api_key=KEY_B)
    while True:
        ids += [i.sandbox_id for i in paginator.next_items()]
        if not paginator.has_next:
            break
    expect(b.sandbox_id in ids and a.sandbox_id not in ids, f"tenant b lists {ids}")
    raising(NotFoundException, lambda: Sandbox.connect(a.sandbox_id, api_key=KEY_B))
    raising(NotFoundException, lambda: Sandbox.get_info(a.sandbox_id, api_key=KEY_B))
    raising(NotFoundException, lambda: Sandbox.set_timeout(a.sandbox_id, 60, api_key=KEY_B))
    expect(Sandbox.kill(a.sandbox_id, api_key=KEY_B) is False, "tenant b killed a's sandbox")
    expect(a.is_running(), "a's sandbox is not running any more")
    # A's own key still reaches it.
    expect(Sandbox.connect(a.sandbox_id).sandbox_id == a.sandbox_id, "a cannot connect")


MISSING = "sbx_" + "0" * 24


def b_headers(port, sandbox_id=None):
    """Everything tenant B owns (its key, its sandbox's tokens), aimed at tenant A's sandbox
    (or at `sandbox_id`)."""
    h = {
        "E2b-Sandbox-Id": sandbox_id or a.sandbox_id,
        "E2b-Sandbox-Port": str(port),
        "X-API-Key": KEY_B,
        "Authorization": f"Bearer {KEY_B}",
    }
    # The SDK keeps the sandbox's envd token private; a hostile tenant would send its own.
    envd_token = getattr(b, "_envd_access_token", None)
    if envd_token:
        h["X-Access-Token"] = envd_token
    if b.traffic_access_token:
        h["E2B-Traffic-Access-Token"] = b.traffic_access_token
    return h


def expect_not_found(what, send):
    """`send(sandbox_id)` aimed at A's sandbox is answered as not found (404, or the 502 "not
    found" of E2B's sandbox proxy), exactly as the same request aimed at a sandbox that does
    not exist: tenant B learns nothing of A's."""
    r = send(a.sandbox_id)
    missing = send(MISSING)
    expect(
        r.status_code in (404, 502) and r.status_code == missing.status_code,
        f"{what}: {r.status_code} {r.text[:200]!r} (a missing sandbox: {missing.status_code})",
    )
    return r.status_code


def envelope(message):
    """One Connect streaming frame: flags, big-endian length, the JSON message."""
    body = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(body)) + body


def rpc_headers(sandbox_id, content_type="application/json"):
    return {
        **b_headers(ENVD_PORT, sandbox_id),
        "Content-Type": content_type,
        "Connect-Protocol-Version": "1",
    }


def tenant_b_raw():
    seen = set()
    # a file of A's
    seen.add(expect_not_found(
        "file read",
        lambda sid: requests.get(f"{ROOT}/files", params={"path": "/mnt/data/secret.txt"}, headers=b_headers(ENVD_PORT, sid), timeout=30),
    ))
    seen.add(expect_not_found(
        "file write",
        lambda sid: requests.post(f"{ROOT}/files", params={"path": "/mnt/data/pwned"}, files={"file": ("pwned", b"pwned")}, headers=b_headers(ENVD_PORT, sid), timeout=30),
    ))
    # a context of A's
    seen.add(expect_not_found(
        "execute in a's context",
        lambda sid: requests.post(f"{ROOT}/execute", json={"code": "open('/mnt/data/pwned', 'w')", "context_id": ctx_js.id}, headers=b_headers(JUPYTER_PORT, sid), timeout=30),
    ))
    seen.add(expect_not_found(
        "execute in a's sandbox",
        lambda sid: requests.post(f"{ROOT}/execute", json={"code": "open('/mnt/data/pwned', 'w')"}, headers=b_headers(JUPYTER_PORT, sid), timeout=30),
    ))
    seen.add(expect_not_found(
        "list a's contexts",
        lambda sid: requests.get(f"{ROOT}/contexts", headers=b_headers(JUPYTER_PORT, sid), timeout=30),
    ))
    seen.add(expect_not_found(
        "remove a's context",
        lambda sid: requests.delete(f"{ROOT}/contexts/{ctx_js.id}", headers=b_headers(JUPYTER_PORT, sid), timeout=30),
    ))
    expect(ctx_js.id in [c.id for c in a.list_code_contexts()], "a's context is gone")
    # a process of A's
    sleeper = a.commands.run("sleep 60", background=True)
    seen.add(expect_not_found(
        "process list",
        lambda sid: requests.post(f"{ROOT}/process.Process/List", json={}, headers=rpc_headers(sid), timeout=30),
    ))
    seen.add(expect_not_found(
        "process kill",
        lambda sid: requests.post(
            f"{ROOT}/process.Process/SendSignal",
            json={"process": {"pid": sleeper.pid}, "signal": "SIGNAL_SIGKILL"},
            headers=rpc_headers(sid),
            timeout=30,
        ),
    ))
    seen.add(expect_not_found(
        "process start",
        lambda sid: requests.post(
            f"{ROOT}/process.Process/Start",
            data=envelope({"process": {"cmd": "/bin/bash", "args": ["-c", "echo pwned > /mnt/data/pwned"]}}),
            headers=rpc_headers(sid, "application/connect+json"),
            timeout=30,
        ),
    ))
    expect(sleeper.pid in [p.pid for p in a.commands.list()], "a's process is gone")
    expect(not a.files.exists("/mnt/data/pwned"), "b changed a's files or ran code in a's sandbox")
    a.commands.kill(sleeper.pid)
    # A's port, with B's traffic token: nothing served
    r = port_request(a.sandbox_id, a.get_host(8001), b.traffic_access_token, {"X-Access-Token": b.traffic_access_token})
    expect(r.status_code in (401, 403, 404, 502) and "secret" not in r.text, f"port with b's token: {r.status_code} {r.text[:200]!r}")
    # B's own sandbox still works for B.
    expect(stdout_of(b.run_code("print(1 + 1)")) == "2\n", "b's own sandbox")
    return f"answered {sorted(seen)} as for a missing sandbox; the port {r.status_code}"


def cleanup():
    expect(b.kill() is True, "b")
    expect(a.kill() is True, "a")


check("create with metadata and envs", create)
check("envs at create visible to commands", envs_at_create)
check("javascript context writes, python reads", two_languages)
check("python contexts keep their own state", python_context_state)
check("a background process runs between run_code calls", background_process)
check("send_stdin to cat", stdin_cat)
check("kill a process", kill_process)
check("a non-zero exit raises CommandExitException", nonzero_exit)
check("run_code error with a traceback", run_code_error)
check("on_stdout / on_stderr / on_result callbacks", callbacks)
check("!echo and %pip in a python cell", shell_and_magic)
check("a port needs its traffic token", port_needs_token)
check("tenant b's SDK cannot reach a's sandbox", tenant_b_sdk)
check("tenant b's credentials on a's files, contexts, processes, port: not found", tenant_b_raw)
check("kill both sandboxes", cleanup)
print("sandbox.py: all checks passed", flush=True)
