"""ampoule's shell kernel: one long-lived bash whose cwd, variables and functions persist.

A small Python driver (this file, with kernelio.py) speaks the protocol; bash runs the code.
Each execution is written to a file under /tmp and sourced by a loop running in the main bash
process (never a subshell, so `cd`, `export` and function definitions stay), which reports the
exit status on a private pipe. The driver owns fds 1 and 2 of bash (pipes it streams), so
output and status are always in order.

An `interrupt` sends SIGINT to bash's process group: the foreground command dies, bash's INT
trap returns from the sourced cell, and the shell lives on. `exit` ends the shell: the driver
reports it and exits, and the host reports the session's state as lost.
"""

import json
import os
import signal
import subprocess
import sys
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernelio  # noqa: E402

BASH = os.environ.get("AMPOULE_BASH", "/usr/bin/bash")
CELL_DIR = "/tmp/.ampoule-shell"

# Runs in the main bash process. $1: fd with "CELL<TAB>PRELUDE" lines, $2: fd for statuses.
# Its first line on $2 is bash's version, written once SIGINT can no longer kill it: until then
# the driver says no hello, so no execution (and no interrupt) reaches a shell that a SIGINT
# would end (a slow start on a busy host otherwise lost the session to its first timeout).
LOOP = r"""
trap '' INT
__ampoule_cmd_fd=$1
__ampoule_status_fd=$2
set --
printf '%s\n' "$BASH_VERSION" >&"$__ampoule_status_fd"
while :; do
  # Armed afresh for every cell: after a trap has returned from a wait for a child, bash
  # would not run it again.
  trap 'return 130 2>/dev/null' INT
  IFS=$'\t' read -r -u "$__ampoule_cmd_fd" __ampoule_cell __ampoule_prelude
  case $? in
    0) ;;
    1) break ;;
    *) continue ;;
  esac
  if [ -n "$__ampoule_prelude" ]; then . "$__ampoule_prelude"; fi
  . "$__ampoule_cell"
  __ampoule_s=$?
  trap '' INT
  printf '%s\n' "$__ampoule_s" >&"$__ampoule_status_fd"
done
"""


def shell_quote(text):
    return "'" + text.replace("'", "'\"'\"'") + "'"


def main():
    chan = kernelio.Channel()
    cmd_r, cmd_w = os.pipe()
    status_r, status_w = os.pipe()
    bash = subprocess.Popen(
        [BASH, "--noprofile", "--norc", "-c", LOOP, "ampoule-shell", str(cmd_r), str(status_w)],
        stdin=subprocess.DEVNULL,
        pass_fds=(cmd_r, status_w),
        start_new_session=True,
    )
    os.close(cmd_r)
    os.close(status_w)
    status_file = os.fdopen(status_r, "r")
    version = status_file.readline().strip()
    if not version:
        chan.log(f"ampoule shell kernel: bash exited at start with status {bash.wait()}\n")
        os._exit(1)
    chan.hello("shell", f"GNU bash {version}")

    state = {"executing": False, "interrupted": False}
    stderr_tail = []

    def on_output(name, text):
        if name == "stderr" and state["executing"]:
            stderr_tail.extend(text.splitlines())
            del stderr_tail[:-10]

    chan.on_output = on_output

    def interrupt():
        if state["executing"]:
            state["interrupted"] = True
            try:
                os.killpg(bash.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    count = 0
    os.makedirs(CELL_DIR, mode=0o700, exist_ok=True)
    requests = iter(chan.requests())
    pending = []
    lock = threading.Condition()

    def read_requests():
        for msg in requests:
            if msg.get("type") == "interrupt":
                interrupt()
            elif msg.get("type") == "execute":
                with lock:
                    pending.append(msg)
                    lock.notify()
        os._exit(0)

    threading.Thread(target=read_requests, name="ampoule-requests", daemon=True).start()

    while True:
        with lock:
            while not pending:
                lock.wait()
            msg = pending.pop(0)
        count += 1
        exec_id = msg["id"]
        chan.current_id = exec_id
        os.makedirs(CELL_DIR, mode=0o700, exist_ok=True)
        cell = f"{CELL_DIR}/cell-{count}.sh"
        with open(cell, "w") as f:
            f.write(msg["code"])
            if not msg["code"].endswith("\n"):
                f.write("\n")
        prelude = ""
        if isinstance(msg.get("inputs"), dict):
            prelude = f"{CELL_DIR}/inputs-{count}.sh"
            with open(prelude, "w") as f:
                f.write(f"export AMPOULE_INPUTS={shell_quote(json.dumps(msg['inputs']))}\n")
        stderr_tail.clear()
        chan.flush()
        state["interrupted"] = False
        state["executing"] = True
        os.write(cmd_w, f"{cell}\t{prelude}\n".encode())
        line = status_file.readline()
        state["executing"] = False
        for path in (cell, prelude):
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        if not line:
            # bash is gone: `exit` in the code, or it was killed.
            code = bash.wait()
            chan.error(
                exec_id,
                "ShellExited",
                f"the shell exited with status {code}; its state is lost",
                list(stderr_tail),
            )
            chan.flush()
            os._exit(0)
        status = int(line.strip() or "1")
        if status == 0:
            chan.done(exec_id, "ok", count, 0)
        else:
            interrupted = state["interrupted"]
            chan.error(
                exec_id,
                "Interrupted" if interrupted else "ExitStatus",
                "interrupted" if interrupted else f"exit status {status}",
                list(stderr_tail),
            )
            chan.done(exec_id, "interrupted" if interrupted else "error", count, status)


if __name__ == "__main__":
    main()
