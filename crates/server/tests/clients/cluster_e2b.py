"""The real E2B SDK (`e2b-code-interpreter`) against a cluster of ampoule replicas (argv: their
root URLs; key: $E2B_API_KEY): a sandbox created through the first replica, then connected to
and driven through each of the others — code with its state, a file written through one and
read through another, a command whose output streams to a callback, the sandbox's listing,
and its end. Prints "sandbox ID" and "cluster e2b OK"; any failure raises."""

import sys
import warnings

warnings.simplefilter("ignore")
from e2b_code_interpreter import Sandbox  # noqa: E402

URLS = [u.rstrip("/") for u in sys.argv[1:]]


def via(i):
    u = URLS[i % len(URLS)]
    return {"api_url": u, "sandbox_url": u}


sbx = Sandbox.create(timeout=300, **via(0))
print("sandbox", sbx.sandbox_id, flush=True)
r = sbx.run_code("x = 40\nx")
assert r.text == "40", r

for i in range(1, len(URLS) + 1):
    s = Sandbox.connect(sbx.sandbox_id, **via(i))
    r = s.run_code("x += 1\nx")
    assert r.text == str(40 + i), (i, r)
    s.files.write(f"/mnt/data/from{i}.txt", f"through replica {i}")
    lines = []
    done = s.commands.run(
        f"cat /mnt/data/from{i}.txt; echo; echo second", on_stdout=lines.append
    )
    assert done.exit_code == 0, done
    assert "".join(lines) == f"through replica {i}\nsecond\n", lines

last = Sandbox.connect(sbx.sandbox_id, **via(2))
assert last.files.read("/mnt/data/from1.txt") == "through replica 1"
out = []
r = last.run_code("print('streamed'); x", on_stdout=lambda m: out.append(m.line))
assert r.text == str(40 + len(URLS)) and "".join(out) == "streamed\n", (r, out)
assert Sandbox.kill(sbx.sandbox_id, **via(1)) is True
print("cluster e2b OK", flush=True)
