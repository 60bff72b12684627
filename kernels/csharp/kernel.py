"""ampoule's C# kernel: Mono's C# evaluator behind the ampoule protocol.

This driver (with kernelio.py) owns the protocol and fds 1 and 2. At start it compiles
evaluator.cs with mcs into /tmp and runs it under mono with a private request pipe and a
private reply pipe (see evaluator.cs for that line protocol); the evaluator's Console output
goes to fds 1 and 2, which kernelio streams. Variables, types and `using`s persist between
executions; a final expression is the result. An `interrupt` aborts the evaluating thread
(Thread.Abort), which keeps the evaluator's state.
"""

import base64
import json
import os
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernelio  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MONO = os.environ.get("AMPOULE_MONO", "/usr/bin/mono")
MCS = os.environ.get("AMPOULE_MCS", "/usr/bin/mcs")
MONO_CSHARP = os.environ.get("AMPOULE_MONO_CSHARP", "/usr/lib/mono/4.5/Mono.CSharp.dll")
BUILD_DIR = "/tmp/.ampoule-csharp"


def b64(text):
    return base64.b64decode(text).decode("utf-8", "replace")


def main():
    chan = kernelio.Channel()
    os.makedirs(BUILD_DIR, mode=0o700, exist_ok=True)
    exe = os.path.join(BUILD_DIR, "evaluator.exe")
    build = subprocess.run(
        [MCS, "-nologo", "-optimize+", f"-r:{MONO_CSHARP}", "-r:System.Xml.dll", f"-out:{exe}",
         os.path.join(HERE, "evaluator.cs")],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        chan.log(f"ampoule csharp kernel: compiling the evaluator failed:\n{build.stdout}{build.stderr}\n")
        os._exit(1)
    # Mono cannot use inherited pipe descriptors as streams: private FIFOs instead. Opening
    # a FIFO waits for the other end, so both sides open requests first, then replies.
    cmd_path = os.path.join(BUILD_DIR, "requests")
    reply_path = os.path.join(BUILD_DIR, "replies")
    for path in (cmd_path, reply_path):
        if os.path.exists(path):
            os.unlink(path)
        os.mkfifo(path, 0o600)
    helper = subprocess.Popen([MONO, exe, cmd_path, reply_path], stdin=subprocess.DEVNULL)
    cmd_w = os.open(cmd_path, os.O_WRONLY | os.O_CLOEXEC)
    replies = open(reply_path, "r", encoding="utf-8")
    write_lock = threading.Lock()

    def tell(line):
        with write_lock:
            os.write(cmd_w, (line + "\n").encode())

    first = replies.readline().split()
    if not first or first[0] != "HELLO":
        chan.log(f"ampoule csharp kernel: the evaluator did not start (exit {helper.wait()})\n")
        os._exit(1)
    chan.hello("csharp", b64(first[1]) if len(first) > 1 else "Mono")

    state = {"executing": False}
    pending = []
    cond = threading.Condition()

    def read_requests():
        for msg in chan.requests():
            if msg.get("type") == "interrupt":
                if state["executing"]:
                    tell("INT")
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
        state["executing"] = True
        tell("EXEC " + base64.b64encode(msg["code"].encode()).decode())
        status = None
        while status is None:
            line = replies.readline()
            if not line:
                state["executing"] = False
                code = helper.wait()
                chan.error(exec_id, "KernelDied", f"the C# evaluator exited with status {code}", [])
                chan.flush()
                os._exit(0)
            fields = line.split()
            kind = fields[0]
            if kind == "RESULT":
                data = {"text/plain": b64(fields[1])}
                raw = b64(fields[3]) if len(fields) > 3 else ""
                if fields[2] == "number":
                    data["application/json"] = json.loads(raw)
                elif fields[2] == "bool":
                    data["application/json"] = raw == "true"
                elif fields[2] == "string":
                    data["application/json"] = raw
                chan.flush()
                chan.send({"type": "result", "id": exec_id, "data": data, "execution_count": count})
            elif kind == "ERROR":
                trace = b64(fields[3]) if len(fields) > 3 else ""
                chan.error(exec_id, b64(fields[1]), b64(fields[2]), trace.splitlines())
            elif kind == "DONE":
                status = fields[1]
        state["executing"] = False
        chan.done(exec_id, status, count)


if __name__ == "__main__":
    main()
