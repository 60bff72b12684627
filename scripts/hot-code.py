#!/usr/bin/python3
"""Measures which functions `ampoule run` and the sandbox's init run, and writes them to
crates/cli/hot-code.txt, the list the linker puts first in the binary (crates/cli/build.rs
says why; docs/BENCHMARKS.md, issue 19 round twelve, what it is worth).

    /usr/bin/python3 scripts/hot-code.py [RUNS | --refine]

Needs root, perf (Debian: linux-perf) and an lld-linked build (rustc >= 1.90 on x86_64);
takes about ten minutes here: a release build, RUNS (default 300) `ampoule run print(1)`
under a 100 kHz CPU-clock sampler, then rounds of page-fault tracing and relinking until no
code outside the list faults (at most five; `--refine`: only those rounds, from the list as
it is). Run it again when the toolchain or Cargo.lock changes: the list's Rust names carry
their crates' hashes, and names the new binary lacks are ignored (the build warns).

Order of the list: functions the forked inits ran first (they touch only those, so they
fault in fewer windows), then those only the command-line process ran, each group by how
often it was sampled; then functions found by the fault rounds (rarely run, so rarely
sampled), in the order they were found.
"""
import bisect
import collections
import datetime
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST = os.path.join(ROOT, "crates", "cli", "hot-code.txt")
REFINE = sys.argv[1:] == ["--refine"]
RUNS = 300 if REFINE or len(sys.argv) < 2 else int(sys.argv[1])
FAULT_RUNS = 6
MAX_ROUNDS = 5
TMP = tempfile.mkdtemp(prefix="hot-code.")


def sh(*args, **kw):
    r = subprocess.run(args, text=True, capture_output=True, **kw)
    if r.returncode != 0:
        sys.exit(f"{' '.join(args)} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return r.stdout


def build():
    """A release build linked with the current list; returns a fresh copy of it (so its comm
    is known and its page cache is its own)."""
    out = sh("bash", os.path.join(ROOT, "scripts", "build.sh"), "--release", cwd=ROOT)
    src = os.path.join(ROOT, out.strip().splitlines()[-1])
    dst = os.path.join(TMP, "ampoule-hot")
    with open(src, "rb") as f, open(dst + ".new", "wb") as g:
        g.write(f.read())
    os.chmod(dst + ".new", 0o755)
    os.replace(dst + ".new", dst)
    return dst


class Symbols:
    """The binary's code symbols by address; every name at an address (aliases included)."""

    def __init__(self, binary):
        by_addr = collections.defaultdict(set)
        size = {}
        for line in sh("nm", "-S", "--no-demangle", binary).splitlines():
            f = line.split()
            if len(f) == 4 and f[2] in "tTwWiI":
                a = int(f[0], 16)
                by_addr[a].add(f[3])
                size[a] = max(size.get(a, 0), int(f[1], 16))
        self.addrs = sorted(by_addr)
        self.names = by_addr
        self.size = size
        text = [ln.split() for ln in sh("readelf", "-lW", binary).splitlines()]
        seg = [f for f in text if f and f[0] == "LOAD" and "E" in "".join(f[6:-1])]
        self.lo = int(seg[0][2], 16)
        self.hi = self.lo + int(seg[0][5], 16)

    def at(self, addr):
        i = bisect.bisect_right(self.addrs, addr) - 1
        if i < 0 or not (self.lo <= addr < self.hi):
            return None
        return self.addrs[i]


def run_under(perf_args, binary, runs):
    data = os.path.join(TMP, "perf.data")
    loop = f'for i in $(seq {runs}); do echo "print(1)" | {binary} run - >/dev/null; done'
    sh("perf", "record", "-q", "-o", data, *perf_args, "--", "bash", "-c", loop)
    return data


def roles(script_lines, comm):
    """Pids of the command-line processes (exec'd) and of the inits (forked by them)."""
    cli, init = set(), set()
    exec_re = re.compile(r"PERF_RECORD_COMM exec: (\S+):(\d+)/")
    fork_re = re.compile(r"PERF_RECORD_FORK\((\d+):\d+\):\((\d+):\d+\)")
    for line in script_lines:
        m = exec_re.search(line)
        if m and m.group(1) == comm:
            cli.add(int(m.group(2)))
            continue
        m = fork_re.search(line)
        if m and (int(m.group(2)) in cli or int(m.group(2)) in init):
            init.add(int(m.group(1)))
    return cli, init


def sample(binary):
    data = run_under(["-e", "cpu-clock", "-c", "10000"], binary, RUNS)
    lines = sh("perf", "script", "-i", data, "--show-task-events", "--no-demangle",
               "-F", "comm,pid,ip,dso").splitlines()
    comm = os.path.basename(binary)[:15]
    cli, init = roles(lines, comm)
    syms = Symbols(binary)
    by_role = {"init": collections.Counter(), "cli": collections.Counter()}
    for line in lines:
        f = line.split()
        if len(f) < 4 or f[0] != comm or not f[-1].startswith("(" + binary):
            continue
        pid = int(f[1].split("/")[0])
        a = syms.at(int(f[2], 16))
        if a is None:
            continue
        name = min(syms.names[a])
        by_role["init" if pid in init else "cli"][name] += 1
    seen_init = [n for n, _ in by_role["init"].most_common()]
    rest = [n for n, _ in by_role["cli"].most_common() if n not in by_role["init"]]
    print(f"sampled: {len(seen_init)} functions in the inits, {len(rest)} more in the CLI "
          f"({len(cli)} runs)", file=sys.stderr)
    return seen_init + rest


def cold_faults(binary, listed):
    """Functions outside the list whose code faulted, and the text faults per process."""
    data = run_under(["-e", "minor-faults", "-c", "1", "-d"], binary, FAULT_RUNS)
    lines = sh("perf", "script", "-i", data, "--show-task-events", "-F",
               "comm,pid,addr").splitlines()
    comm = os.path.basename(binary)[:15]
    cli, init = roles(lines, comm)
    syms = Symbols(binary)
    found, faults = [], collections.Counter()
    for line in lines:
        f = line.split()
        if len(f) != 3 or f[0] != comm or f[2].startswith("PERF_RECORD"):
            continue
        a = syms.at(int(f[2], 16))
        if a is None:
            continue
        pid = int(f[1])
        faults["init" if pid in init else "cli"] += 1
        names = syms.names[a]
        if not names & listed:
            name = min(names)
            if name not in found:
                found.append(name)
    per_run = {k: round(v / FAULT_RUNS, 1) for k, v in faults.items()}
    return found, per_run


def write(names):
    rustc = sh("rustc", "-V").strip()
    with open(LIST + ".new", "w") as f:
        f.write("# Functions `ampoule run` and the sandbox's init run, hottest first, for the\n"
                "# linker to put first (crates/cli/build.rs). Written by scripts/hot-code.py\n"
                f"# on {datetime.date.today()} with {rustc}; {len(names)} names.\n")
        f.write("".join(n + "\n" for n in names))
    os.replace(LIST + ".new", LIST)


def main():
    if REFINE:
        with open(LIST) as f:
            names = [n.strip() for n in f if n.strip() and not n.startswith("#")]
    else:
        names = sample(build())
        write(names)
    for round_no in range(1, MAX_ROUNDS + 1):
        binary = build()
        found, per_run = cold_faults(binary, set(names))
        print(f"round {round_no}: code faults per run {per_run}, {len(found)} functions "
              "outside the list", file=sys.stderr)
        if not found:
            break
        names += found
        write(names)
    print(f"{LIST}: {len(names)} names", file=sys.stderr)


if __name__ == "__main__":
    main()
