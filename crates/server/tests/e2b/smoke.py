"""The headline E2B scenario, written as a user of E2B's cloud writes it, run against
`ampoule serve` by crates/server/tests/e2b.rs with only E2B_API_URL, E2B_SANDBOX_URL (both the
server's root URL) and E2B_API_KEY (an ampoule key) set.

The one thing an E2B-cloud script would not do: a sandbox port is reached through the server's
root URL with the `Host` header `get_host` answered (there is no wildcard DNS here), plus the
sandbox's traffic access token.

One line per check; the first failure ends the script with a non-zero status and its reason.
"""

import base64
import os
import sys
import time
import traceback
import uuid

import requests
from e2b_code_interpreter import Sandbox

RUN = uuid.uuid4().hex[:12]


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


def port_get(sbx, port, path, token=True):
    """GET `path` on the sandbox's `port`: E2B's https://{get_host(port)}{path}, sent to the
    server's root URL with that name as `Host`."""
    headers = {"Host": sbx.get_host(port)}
    if token and sbx.traffic_access_token:
        headers["e2b-traffic-access-token"] = sbx.traffic_access_token
    return requests.get(
        os.environ["E2B_SANDBOX_URL"].rstrip("/") + path, headers=headers, timeout=30
    )


sbx = None


def create():
    global sbx
    sbx = Sandbox.create(metadata={"suite": "smoke-py", "run": RUN}, timeout=300)
    expect(sbx.sandbox_id, "no sandbox id")
    return sbx.sandbox_id


def pandas_chart():
    ex = sbx.run_code(
        "import pandas as pd\n"
        "import matplotlib.pyplot as plt\n"
        "df = pd.DataFrame({'x': [1, 2, 3], 'y': [1, 4, 9]})\n"
        "print(df['y'].sum())\n"
        "plt.plot(df['x'], df['y'])\n"
        "plt.title('squares')\n"
        "plt.show()\n"
    )
    expect(ex.error is None, f"error: {ex.error}")
    expect("".join(ex.logs.stdout).strip() == "14", f"stdout {ex.logs.stdout!r}")
    pngs = [r.png for r in ex.results if r.png]
    expect(pngs, f"no PNG result among {ex.results!r}")
    raw = base64.b64decode(pngs[0])
    expect(raw.startswith(b"\x89PNG\r\n\x1a\n"), "the PNG result is not a PNG")
    return f"{len(raw)} bytes of PNG"


def value_result():
    ex = sbx.run_code("6 * 7")
    expect(ex.error is None, f"error: {ex.error}")
    expect(ex.text == "42", f"text {ex.text!r}")


def pip_list():
    r = sbx.commands.run("pip list | head")
    expect(r.exit_code == 0, f"exit {r.exit_code}: {r.stderr}")
    lines = r.stdout.splitlines()
    expect(lines and lines[0].split()[:2] == ["Package", "Version"], f"stdout {r.stdout!r}")
    expect(len(lines) > 2, f"no package listed: {r.stdout!r}")
    return f"{len(lines) - 2} packages shown"


def write_read():
    sbx.files.write("/mnt/data/hello.txt", "hello from e2b\n")
    got = sbx.files.read("/mnt/data/hello.txt")
    expect(got == "hello from e2b\n", f"read {got!r}")


def upload_download():
    payload = bytes(range(256)) * 1024 + os.urandom(4096)
    sbx.files.write("/mnt/data/blob.bin", payload)
    got = sbx.files.read("/mnt/data/blob.bin", format="bytes")
    expect(bytes(got) == payload, f"{len(got)} bytes back for {len(payload)}, or not the same")
    ex = sbx.run_code("import os; print(os.path.getsize('/mnt/data/blob.bin'))")
    expect("".join(ex.logs.stdout).strip() == str(len(payload)), f"{ex.logs.stdout!r}")
    return f"{len(payload)} bytes"


def http_server():
    handle = sbx.commands.run(
        "python -m http.server 8000", background=True, cwd="/mnt/data"
    )
    expect(handle.pid, "no pid")
    deadline = time.monotonic() + 30
    last = None
    while time.monotonic() < deadline:
        try:
            last = port_get(sbx, 8000, "/hello.txt")
            if last.status_code == 200:
                break
        except requests.RequestException as e:
            last = e
        time.sleep(0.5)
    expect(
        isinstance(last, requests.Response) and last.status_code == 200,
        f"port 8000 never answered 200: {last!r} "
        f"{getattr(last, 'text', '')[:300]!r}",
    )
    expect(last.text == "hello from e2b\n", f"body {last.text!r}")
    return f"{sbx.get_host(8000)} served hello.txt"


def listed():
    found = None
    paginator = Sandbox.list()
    while found is None:
        for info in paginator.next_items():
            if info.sandbox_id == sbx.sandbox_id:
                found = info
        if not paginator.has_next:
            break
    expect(found is not None, "the sandbox is not in Sandbox.list()")
    expect(
        found.metadata.get("suite") == "smoke-py" and found.metadata.get("run") == RUN,
        f"metadata {found.metadata!r}",
    )


def pause_connect():
    global sbx
    sbx.run_code("kept = 6 * 7")
    expect(sbx.pause() is True, "pause() did not answer True")
    expect(sbx.pause() is False, "a second pause() did not answer False (already paused)")
    state = sbx.get_info().state
    expect(state == "paused", f"state {state!r} while paused")
    sbx = Sandbox.connect(sbx.sandbox_id)
    r = sbx.run_code("kept")
    expect(r.text == "42", f"the variable did not survive the pause: {r.text!r}")
    body = sbx.files.read("/mnt/data/hello.txt")
    expect(body == "hello from e2b\n", f"hello.txt after the pause: {body!r}")
    state = sbx.get_info().state
    expect(state == "running", f"state {state!r} after connect")


def set_timeout():
    before = sbx.get_info().end_at
    sbx.set_timeout(900)
    after = sbx.get_info().end_at
    expect(after > before, f"end_at {before} -> {after}")
    return f"end_at {before:%H:%M:%S} -> {after:%H:%M:%S}"


def kill():
    sid = sbx.sandbox_id
    expect(sbx.kill() is True, "kill() did not answer True")
    expect(not sbx.is_running(), "still running after kill")
    ids = []
    paginator = Sandbox.list()
    while True:
        ids += [i.sandbox_id for i in paginator.next_items()]
        if not paginator.has_next:
            break
    expect(sid not in ids, "still listed after kill")
    expect(Sandbox.kill(sid) is False, "a second kill found it")


check("create", create)
check("run_code pandas and a chart -> PNG", pandas_chart)
check("run_code value", value_result)
check("commands.run pip list | head", pip_list)
check("files.write then files.read", write_read)
check("upload and download bytes", upload_download)
check("background http.server through get_host", http_server)
check("Sandbox.list shows it with its metadata", listed)
check("pause, connect, state and files kept", pause_connect)
check("set_timeout", set_timeout)
check("kill, then it is gone", kill)
print("smoke.py: all checks passed", flush=True)
