"""ampoule's Python kernel: runs code against persistent globals and reports rich results.

Started by the host as `python /run/ampoule/kernel.py` inside the sandbox, next to
`kernelio.py` (the protocol and output plumbing). Per execution it:

* parses the code (top-level `await` allowed), runs every statement but the last, and evaluates
  a final expression: its value becomes a `result` (text/plain repr, application/json for plain
  JSON values, and the object's rich reprs: _repr_html_, _repr_png_, _repr_svg_, ...);
* gives the code `display()`, `inputs` (when the request carries them) and `pip_install()`;
  `%pip install ...` and `!command` lines work like in Jupyter;
* sends matplotlib figures as PNG displays, on plt.show() and for figures left open;
* reports exceptions with a traceback that starts at the user's code, never the kernel's;
* on an `interrupt` request raises KeyboardInterrupt in the code (SIGINT to the main thread).
"""

import ast
import asyncio
import base64
import io
import json
import linecache
import math
import os
import platform
import queue
import shlex
import signal
import subprocess
import sys
import threading
import traceback
import types

sys.path[:] = [p for p in sys.path if p != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernelio  # noqa: E402

sys.path.pop(0)
sys.modules.pop("kernelio", None)

KERNEL_FILE = os.path.abspath(__file__)
ASYNCIO_DIR = os.path.dirname(asyncio.__file__)
# Where %pip installs packages: the environment itself is read-only.
SITE_DIR = "/tmp/ampoule-site-packages"
MAX_JSON_RESULT = 1024 * 1024

# Made by main(): importing the kernel (as the zygote does before forking) must start no
# thread and open no descriptor.
chan = None
# The user's code gets a fresh __main__ (so pickling its classes works); the kernel keeps its
# own globals.
_main = types.ModuleType("__main__")
sys.modules["__main__"] = _main
user_ns = _main.__dict__

state = {"executing": False, "count": 0}
main_thread = threading.main_thread()
loop = None


# -- rich output ----------------------------------------------------------------------------


def _is_json(value, depth=0):
    if depth > 64:
        return False
    if value is None or isinstance(value, (bool, str)):
        return True
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if type(value) is list:
        return all(_is_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(isinstance(k, str) and _is_json(v, depth + 1) for k, v in value.items())
    return False


REPR_METHODS = (
    ("_repr_html_", "text/html"),
    ("_repr_markdown_", "text/markdown"),
    ("_repr_svg_", "image/svg+xml"),
    ("_repr_png_", "image/png"),
    ("_repr_jpeg_", "image/jpeg"),
    ("_repr_latex_", "text/latex"),
    ("_repr_json_", "application/json"),
)


def mime_bundle(obj):
    """Every representation of obj the host can show."""
    data = {}
    if not isinstance(obj, type):
        for method, mime in REPR_METHODS:
            try:
                fn = getattr(obj, method, None)
                if not callable(fn):
                    continue
                value = fn()
            except Exception:
                continue
            if isinstance(value, tuple):
                value = value[0]
            if value is None:
                continue
            if mime in ("image/png", "image/jpeg"):
                if isinstance(value, (bytes, bytearray)):
                    value = base64.b64encode(value).decode("ascii")
                elif not isinstance(value, str):
                    continue
            elif mime == "application/json":
                if not _is_json(value):
                    continue
            elif not isinstance(value, str):
                continue
            data[mime] = value
        try:
            bundle = getattr(obj, "_repr_mimebundle_", None)
            extra = bundle() if callable(bundle) else None
            if isinstance(extra, tuple):
                extra = extra[0]
            if isinstance(extra, dict):
                for mime, value in extra.items():
                    if isinstance(mime, str) and _is_json(value):
                        data.setdefault(mime, value)
        except Exception:
            pass
    if "application/json" not in data and _is_json(obj):
        try:
            if len(json.dumps(obj)) <= MAX_JSON_RESULT:
                data["application/json"] = obj
        except (TypeError, ValueError):
            pass
    try:
        data["text/plain"] = repr(obj)
    except Exception as e:  # a broken __repr__ must not break the kernel
        data["text/plain"] = f"<unrepresentable {type(obj).__name__}: {e!r}>"
    return data


def display(*objs, raw=False):
    """Shows objects as rich outputs (raw=True: each object is already a MIME bundle)."""
    chan.flush()
    for obj in objs:
        data = obj if raw else mime_bundle(obj)
        chan.send({"type": "display", "id": chan.current_id, "data": data})


def _send_figures():
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    try:
        nums = pyplot.get_fignums()
    except Exception:
        return
    for num in nums:
        try:
            fig = pyplot.figure(num)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", bbox_inches="tight")
            display(
                {
                    "image/png": base64.b64encode(buf.getvalue()).decode("ascii"),
                    "text/plain": repr(fig),
                },
                raw=True,
            )
        except Exception as e:
            print(f"ampoule: could not render figure {num}: {e!r}", file=sys.stderr)
    try:
        pyplot.close("all")
    except Exception:
        pass


class _PyplotHook:
    """Makes plt.show() send the open figures, whenever the code first imports pyplot."""

    def find_spec(self, name, path, target=None):
        if name != "matplotlib.pyplot":
            return None
        import importlib.machinery

        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            module.show = lambda *args, **kwargs: _send_figures()

        spec.loader.exec_module = exec_and_patch
        return spec


sys.meta_path.insert(0, _PyplotHook())


# -- packages and shell escapes -----------------------------------------------------------


def pip_install(*args):
    """Installs packages (an uploaded wheel: pip_install("/mnt/data/x.whl")) into the session."""
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check",
           "--no-input", "--target", SITE_DIR, *args]
    chan.flush()
    status = subprocess.call(cmd)
    if SITE_DIR not in sys.path:
        sys.path.insert(0, SITE_DIR)
    os.environ["PYTHONPATH"] = SITE_DIR
    import importlib

    importlib.invalidate_caches()
    if status != 0:
        raise RuntimeError(f"pip install failed with exit status {status}")


def _magic_pip(line):
    args = shlex.split(line)
    if args and args[0] == "install":
        pip_install(*args[1:])
    else:
        subprocess.call([sys.executable, "-m", "pip", *args])


def _magic_system(line):
    subprocess.call(line, shell=True)


user_ns["display"] = display
user_ns["pip_install"] = pip_install
user_ns["_ampoule_pip"] = _magic_pip
user_ns["_ampoule_system"] = _magic_system
import builtins  # noqa: E402

builtins.display = display


def _transform_magics(code):
    """Rewrites `%pip ...` and `!cmd` lines (only called when the code is not valid Python)."""
    out = []
    for line in code.split("\n"):
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        if stripped.startswith("%pip ") or stripped.startswith("!pip "):
            out.append(f"{indent}_ampoule_pip({stripped[5:]!r})")
        elif stripped.startswith("!"):
            out.append(f"{indent}_ampoule_system({stripped[1:]!r})")
        else:
            out.append(line)
    return "\n".join(out)


# -- execution ------------------------------------------------------------------------------

FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


def _parse(code, filename):
    try:
        return compile(code, filename, "exec", ast.PyCF_ONLY_AST | FLAGS), code
    except SyntaxError as first:
        transformed = _transform_magics(code)
        if transformed == code:
            raise
        try:
            return compile(transformed, filename, "exec", ast.PyCF_ONLY_AST | FLAGS), transformed
        except SyntaxError:
            raise first from None


def _run(node, filename, mode):
    code = compile(node, filename, mode, flags=FLAGS)
    value = eval(code, user_ns)
    if code.co_flags & 0x80:  # CO_COROUTINE: the code awaited at top level
        value = loop.run_until_complete(value)
    return value


def _is_kernel_frame(frame):
    return frame.filename == KERNEL_FILE or frame.filename.startswith(ASYNCIO_DIR)


def _strip_kernel(te, seen):
    """Drops the kernel's own frames from a TracebackException and its chain."""
    if te is None or id(te) in seen:
        return
    seen.add(id(te))
    frames = [f for f in te.stack if not _is_kernel_frame(f)]
    # What comes before the first frame of a cell is the kernel's machinery (ast.parse for a
    # SyntaxError, say).
    while frames and not frames[0].filename.startswith("<cell "):
        frames.pop(0)
    te.stack = traceback.StackSummary.from_list(frames)
    _strip_kernel(te.__cause__, seen)
    _strip_kernel(te.__context__, seen)


def _user_traceback(exc):
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__, compact=True)
    _strip_kernel(te, set())
    return "".join(te.format()).rstrip("\n").split("\n")


def _report(exec_id, exc):
    ename = type(exc).__name__
    try:
        evalue = str(exc)
    except Exception:
        evalue = ""
    chan.error(exec_id, ename, evalue, _user_traceback(exc))


def _on_sigint(signum, frame):
    if state["executing"]:
        raise KeyboardInterrupt


signal.signal(signal.SIGINT, _on_sigint)


def execute(msg):
    # Frames a previous execution held back and never sent (it broke before `done`).
    chan.release()
    exec_id = msg["id"]
    state["count"] += 1
    count = state["count"]
    chan.current_id = exec_id
    if isinstance(msg.get("inputs"), dict):
        user_ns["inputs"] = msg["inputs"]
    filename = f"<cell {count}>"
    status = "ok"
    try:
        try:
            state["executing"] = True
            tree, source = _parse(msg["code"], filename)
            linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = tree.body.pop()
            if tree.body:  # a cell that is one expression compiles once, not twice
                _run(ast.Module(body=tree.body, type_ignores=[]), filename, "exec")
            if last is not None:
                value = _run(ast.Expression(body=last.value), filename, "eval")
                if value is not None:
                    user_ns["_"] = value
                    data = mime_bundle(value)
                    chan.flush()
                    # The result and what follows it (figures, then `done`) leave in one write.
                    chan.hold()
                    chan.send(
                        {"type": "result", "id": exec_id, "data": data, "execution_count": count}
                    )
        except BaseException:
            # Figures drawn before an error are shown too, as in Jupyter.
            _send_figures()
            raise
        else:
            _send_figures()
        finally:
            state["executing"] = False
    except KeyboardInterrupt as e:
        status = "interrupted"
        _report(exec_id, e)
    except SystemExit as e:
        if e.code not in (None, 0):
            status = "error"
            _report(exec_id, e)
    except BaseException as e:
        status = "error"
        _report(exec_id, e)
    chan.done(exec_id, status, count)


def main():
    global chan, loop
    chan = kernelio.Channel()
    loop = asyncio.new_event_loop()
    venv = sys.prefix != sys.base_prefix
    chan.hello("python", f"CPython {platform.python_version()}" + (" (venv)" if venv else ""))
    requests = queue.Queue()

    def read_requests():
        for msg in chan.requests():
            kind = msg.get("type")
            if kind == "interrupt":
                if state["executing"]:
                    signal.pthread_kill(main_thread.ident, signal.SIGINT)
            elif kind == "execute":
                requests.put(msg)
        os._exit(0)

    threading.Thread(target=read_requests, name="ampoule-requests", daemon=True).start()
    while True:
        try:
            msg = requests.get()
            execute(msg)
        except KeyboardInterrupt:
            # An interrupt that arrived just as an execution ended.
            continue
        except BaseException as e:  # the kernel itself broke: say so, keep serving
            chan.log(f"ampoule kernel: {e!r}\n")


if __name__ == "__main__":
    main()
