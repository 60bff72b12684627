"""Plumbing shared by ampoule's Python-hosted kernels (python, shell, csharp).

Owns the process's standard descriptors and the protocol streams (see crates/protocol):

* At start-up the original stdin and stdout become private, non-inheritable descriptors that
  carry framed requests and events (4-byte big-endian length, then JSON). The original
  stderr is kept as a private log for the kernel's own fatal errors.
* fd 0 becomes /dev/null; fds 1 and 2 become pipes that a pump thread reads and turns into
  `stream` events, so output of print(), C extensions and child processes alike is streamed and
  never corrupts the protocol.
* `flush()` makes every byte written to fds 1 and 2 so far into events before it returns: it
  drains both pipes under the same lock the pump uses. A kernel calls it before `display`,
  `result`, `error` and `done`, which keeps the order the user expects.
"""

import codecs
import contextlib
import json
import os
import select
import signal
import struct
import sys
import threading

PROTOCOL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024 * 1024
CHUNK = 64 * 1024


class Channel:
    """The protocol streams and the captured fds 1 and 2 of this process."""

    def __init__(self):
        self._in = os.dup(0)
        self._out = os.dup(1)
        self.log_fd = os.dup(2)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        self._pipes = {}
        for fd, name in ((1, "stdout"), (2, "stderr")):
            r, w = os.pipe()
            os.dup2(w, fd)
            os.close(w)
            os.set_blocking(r, False)
            self._pipes[r] = (name, codecs.getincrementaldecoder("utf-8")("replace"))
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.reconfigure(line_buffering=True, write_through=True)
            except (AttributeError, ValueError):
                pass
        self._lock = threading.RLock()
        # Frames kept back by `hold()` until `done()` writes them with the `done` frame.
        self._held = None
        # The execution that output is attributed to (the last one when idle: the host drops
        # output of executions that are over).
        self.current_id = ""
        # Called with (name, text) for every piece of output, under the lock.
        self.on_output = None
        threading.Thread(target=self._pump, name="ampoule-pump", daemon=True).start()

    # -- events ---------------------------------------------------------------------------

    def send(self, msg, release=False):
        payload = json.dumps(msg, ensure_ascii=False, separators=(",", ":")).encode(
            "utf-8", "surrogatepass"
        )
        frame = struct.pack(">I", len(payload)) + payload
        with self._writing():
            if self._held is not None:
                self._held.append(frame)
                if release:
                    frame, self._held = b"".join(self._held), None
                    self._write(frame)
            else:
                self._write(frame)

    @contextlib.contextmanager
    def _writing(self):
        """Holds the lock; on the main thread, an interrupt (SIGINT) stays pending meanwhile:
        it must never cut a frame in half."""
        blocked = threading.current_thread() is threading.main_thread()
        if blocked:
            old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])
        try:
            with self._lock:
                yield
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def _write(self, frame):
        view = memoryview(frame)
        while view:
            n = os.write(self._out, view)
            view = view[n:]

    def release(self):
        """Writes what `hold()` kept, if anything (an execution that never reached `done`)."""
        if self._held is not None:
            with self._writing():
                held, self._held = self._held, None
                if held:
                    self._write(b"".join(held))

    def hold(self):
        """Keeps every frame from now on (in order) until `done()` writes them with its own in
        one write: an execution's last events reach the host in one wake-up, not several."""
        with self._lock:
            if self._held is None:
                self._held = []

    def log(self, text):
        """Writes to the kernel's own stderr (the host keeps its tail for diagnostics)."""
        try:
            os.write(self.log_fd, text.encode("utf-8", "replace"))
        except OSError:
            pass

    # -- captured output ------------------------------------------------------------------

    def _drain_locked(self):
        for fd, (name, decoder) in self._pipes.items():
            while True:
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                if not data:
                    break
                text = decoder.decode(data)
                if text:
                    if self.on_output is not None:
                        self.on_output(name, text)
                    self.send(
                        {"type": "stream", "id": self.current_id, "name": name, "text": text}
                    )

    def _pump(self):
        fds = list(self._pipes)
        while True:
            try:
                select.select(fds, [], [])
            except InterruptedError:
                continue
            with self._lock:
                self._drain_locked()

    def flush(self):
        """Turns everything written to fds 1 and 2 so far into stream events."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        with self._lock:
            # Most executions print nothing more: one poll instead of a read of each pipe.
            ready, _, _ = select.select(list(self._pipes), [], [], 0)
            if ready:
                self._drain_locked()

    # -- requests -------------------------------------------------------------------------

    def _read_exact(self, n):
        chunks = []
        while n:
            try:
                data = os.read(self._in, min(n, CHUNK))
            except InterruptedError:
                continue
            if not data:
                return None
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def requests(self):
        """Yields decoded requests until the host closes the stream."""
        while True:
            header = self._read_exact(4)
            if header is None:
                return
            (length,) = struct.unpack(">I", header)
            if length > MAX_REQUEST_BYTES:
                self.log(f"ampoule kernel: request of {length} bytes refused\n")
                return
            payload = self._read_exact(length)
            if payload is None:
                return
            yield json.loads(payload)

    def hello(self, language, runtime):
        self.send(
            {
                "type": "hello",
                "protocol_version": PROTOCOL_VERSION,
                "language": language,
                "runtime": runtime,
            }
        )

    def done(self, exec_id, status, count, exit_code=None):
        self.flush()
        msg = {"type": "done", "id": exec_id, "status": status, "execution_count": count}
        if exit_code is not None:
            msg["exit_code"] = exit_code
        self.send(msg, release=True)

    def error(self, exec_id, ename, evalue, traceback):
        self.flush()
        self.send(
            {
                "type": "error",
                "id": exec_id,
                "ename": ename,
                "evalue": evalue,
                "traceback": traceback,
            }
        )
