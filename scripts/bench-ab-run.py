#!/usr/bin/python3
"""A/B of two `ampoule` binaries' `ampoule run print(1)`, interleaved with a bare interpreter
and bubblewrap so machine noise hits all four alike (docs/BENCHMARKS.md, issue 19 round four).

    /usr/bin/python3 scripts/bench-ab-run.py OLD_AMPOULE NEW_AMPOULE [SAMPLES [GAP_S]]

Prints, for each, the median (and 90th percentile) wall time and the median CPU of its whole process tree
(RUSAGE_CHILDREN), and both as overheads over the bare interpreter. Needs root (like
`ampoule run` with cgroups) and bubblewrap.
"""
import resource
import statistics
import subprocess
import sys
import time

OLD, NEW = sys.argv[1], sys.argv[2]
N = int(sys.argv[3]) if len(sys.argv) > 3 else 60
# Seconds of quiet before each sample, so that what one run leaves the kernel to finish (its
# network namespace's clean-up, `ampoule run`'s outer init exiting) does not land on the next.
GAP = float(sys.argv[4]) if len(sys.argv) > 4 else 0.03
PY = "/usr/bin/python3"
BWRAP = ["bwrap", "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib",
         "--symlink", "usr/lib64", "/lib64", "--symlink", "usr/bin", "/bin", "--proc", "/proc",
         "--dev", "/dev", "--tmpfs", "/tmp", "--unshare-all", "--die-with-parent",
         "--new-session", PY, "-c", "pass"]
CMDS = {
    "bare": ([PY, "-c", "pass"], None),
    "bwrap": (BWRAP, None),
    "old": ([OLD, "run", "-"], b"print(1)\n"),
    "new": ([NEW, "run", "-"], b"print(1)\n"),
}
wall = {k: [] for k in CMDS}
cpu = {k: [] for k in CMDS}


def cpu_ms(r):
    return (r.ru_utime + r.ru_stime) * 1000


def one(k):
    argv, stdin = CMDS[k]
    time.sleep(GAP)
    r0, t0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    p = subprocess.run(argv, input=stdin, capture_output=True)
    t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        sys.exit(f"{k} failed: {p.stderr.decode(errors='replace')}")
    wall[k].append((t1 - t0) * 1000)
    cpu[k].append(cpu_ms(r1) - cpu_ms(r0))


for k in CMDS:  # warm the page cache
    one(k)
for k in CMDS:
    wall[k].clear()
    cpu[k].clear()
# Alternate the two binaries' order every round: a run's own tear-down may go on after it has
# answered (the kernel's, and `ampoule run`'s outer init), and would otherwise always fall on
# the same neighbour.
for i in range(N):
    for k in (["bare", "bwrap", "old", "new"] if i % 2 == 0 else ["bare", "bwrap", "new", "old"]):
        one(k)
bare_wall, bare_cpu = statistics.median(wall["bare"]), statistics.median(cpu["bare"])
print("load", " ".join(open("/proc/loadavg").read().split()[:3]), "samples", N)
for k in CMDS:
    w, c = statistics.median(wall[k]), statistics.median(cpu[k])
    # bubblewrap's program is reaped inside its namespace: its tree's CPU is not all counted.
    note = "  (cpu undercounted)" if k == "bwrap" else ""
    p90 = sorted(wall[k])[int(len(wall[k]) * 0.9)]
    print(f"{k:6} wall p50 {w:6.2f} ms (+{w - bare_wall:5.2f})  p90 {p90:6.2f}  "
          f"cpu p50 {c:6.2f} ms (+{c - bare_cpu:5.2f}){note}")
# Per round, each binary against the bubblewrap run next to it: the machine's slow spells move
# both alike, so the median of these differences holds steadier than a difference of medians.
for k in ("old", "new"):
    d = sorted(a - b for a, b in zip(wall[k], wall["bwrap"]))
    print(f"{k:6} minus bwrap, paired by round: p50 {statistics.median(d):+5.2f} ms  "
          f"p25 {d[len(d) // 4]:+5.2f}  p75 {d[3 * len(d) // 4]:+5.2f}")
