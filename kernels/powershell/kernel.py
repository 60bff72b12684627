"""ampoule's PowerShell kernel: one long-lived pwsh whose variables and functions persist.

This driver (with kernelio.py) owns the protocol and fds 1 and 2; pwsh runs loop.ps1, which
dot-sources each cell from a file under /tmp and reports on private FIFOs. An `interrupt`
sends SIGINT to pwsh, which stops the running pipeline.

Not yet exercised on a host with pwsh (Debian does not ship it): the tests run it wherever
pwsh is installed.
"""

import base64
import os
import signal
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernelio  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PWSH = os.environ.get("AMPOULE_PWSH", "/usr/bin/pwsh")
WORK_DIR = "/tmp/.ampoule-powershell"


def b64(text):
    return base64.b64decode(text).decode("utf-8", "replace")


def main():
    chan = kernelio.Channel()
    os.makedirs(WORK_DIR, mode=0o700, exist_ok=True)
    requests_path = os.path.join(WORK_DIR, "requests")
    replies_path = os.path.join(WORK_DIR, "replies")
    for path in (requests_path, replies_path):
        if os.path.exists(path):
            os.unlink(path)
        os.mkfifo(path, 0o600)
    pwsh = subprocess.Popen(
        [PWSH, "-NoLogo", "-NoProfile", "-NonInteractive", "-File", os.path.join(HERE, "loop.ps1"),
         requests_path, replies_path],
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    # Opening a FIFO waits for the other end: both sides open requests first, then replies.
    cmd_w = os.open(requests_path, os.O_WRONLY | os.O_CLOEXEC)
    replies = open(replies_path, "r", encoding="utf-8")
    first = replies.readline().split()
    if not first or first[0] != "HELLO":
        chan.log(f"ampoule powershell kernel: pwsh did not start (exit {pwsh.wait()})\n")
        os._exit(1)
    chan.hello("powershell", b64(first[1]) if len(first) > 1 else "PowerShell")

    state = {"executing": False, "interrupted": False}
    pending = []
    cond = threading.Condition()

    def read_requests():
        for msg in chan.requests():
            if msg.get("type") == "interrupt":
                if state["executing"]:
                    state["interrupted"] = True
                    try:
                        os.kill(pwsh.pid, signal.SIGINT)
                    except ProcessLookupError:
                        pass
            elif msg.get("type") == "execute":
                with cond:
                    pending.append(msg)
                    cond.notify()
        os._exit(0)

    threading.Thread(target=read_requests, name="ampoule-requests", daemon=True).start()

    count = 0
    while True:
        with cond:
            while not pending:
                cond.wait()
            msg = pending.pop(0)
        count += 1
        exec_id = msg["id"]
        chan.current_id = exec_id
        cell = os.path.join(WORK_DIR, f"cell-{count}.ps1")
        with open(cell, "w", encoding="utf-8") as f:
            f.write(msg["code"])
        state["interrupted"] = False
        state["executing"] = True
        os.write(cmd_w, (cell + "\n").encode())
        status = None
        while status is None:
            line = replies.readline()
            if not line:
                state["executing"] = False
                code = pwsh.wait()
                chan.error(exec_id, "KernelDied", f"pwsh exited with status {code}", [])
                chan.flush()
                os._exit(0)
            fields = line.split()
            if fields[0] == "ERROR":
                trace = b64(fields[3]) if len(fields) > 3 else ""
                chan.error(exec_id, b64(fields[1]), b64(fields[2]), trace.splitlines())
            elif fields[0] == "DONE":
                status = fields[1]
        state["executing"] = False
        try:
            os.unlink(cell)
        except OSError:
            pass
        if state["interrupted"]:
            status = "interrupted"
        chan.done(exec_id, status, count)


if __name__ == "__main__":
    main()
