//! Startup overhead of a sandbox: `ampoule run` of `print(1)` against the same interpreter run
//! bare (and under bubblewrap when installed), interleaved so machine noise hits all alike.
//!
//! `cargo bench -p ampoule-cli --bench startup [-- N]` prints median, p90 and p99 in ms with
//! sample counts and success rates; docs/BENCHMARKS.md records the latest figures.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

const PYTHON: &str = "/usr/bin/python3";

struct Series {
    name: &'static str,
    samples: Vec<f64>,
    failures: usize,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            samples: Vec::new(),
            failures: 0,
        }
    }

    fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return f64::NAN;
        }
        let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
        s[i.min(s.len() - 1)]
    }
}

fn time(mut cmd: Command, stdin: Option<&[u8]>, expect: &str) -> Option<f64> {
    cmd.stdout(Stdio::piped()).stderr(Stdio::null());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let start = Instant::now();
    let mut child = cmd.spawn().ok()?;
    if let Some(data) = stdin {
        child.stdin.take()?.write_all(data).ok()?;
    }
    let out = child.wait_with_output().ok()?;
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    (out.status.success() && String::from_utf8_lossy(&out.stdout) == expect).then_some(ms)
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(100);
    let ampoule = env!("CARGO_BIN_EXE_ampoule");
    let bwrap = ["/usr/bin/bwrap", "/bin/bwrap"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());

    let mut bare = Series::new("python3 -c 'print(1)' (bare)");
    let mut sandboxed = Series::new("ampoule run print(1)");
    let mut bw = Series::new("bwrap --unshare-all python3 -c 'print(1)'");
    // Warm the page cache and the sandbox paths once.
    for _ in 0..3 {
        let mut c = Command::new(PYTHON);
        c.args(["-c", "print(1)"]);
        let _ = time(c, None, "1\n");
        let mut c = Command::new(ampoule);
        c.args(["run", "-"]);
        let _ = time(c, Some(b"print(1)\n"), "1\n");
    }
    for _ in 0..n {
        let mut c = Command::new(PYTHON);
        c.args(["-c", "print(1)"]);
        match time(c, None, "1\n") {
            Some(ms) => bare.samples.push(ms),
            None => bare.failures += 1,
        }
        let mut c = Command::new(ampoule);
        c.args(["run", "-"]);
        match time(c, Some(b"print(1)\n"), "1\n") {
            Some(ms) => sandboxed.samples.push(ms),
            None => sandboxed.failures += 1,
        }
        if let Some(b) = bwrap {
            let mut c = Command::new(b);
            c.args([
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/lib",
                "/lib",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--symlink",
                "usr/bin",
                "/bin",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--tmpfs",
                "/tmp",
                "--unshare-all",
                "--die-with-parent",
                "--new-session",
                PYTHON,
                "-c",
                "print(1)",
            ]);
            match time(c, None, "1\n") {
                Some(ms) => bw.samples.push(ms),
                None => bw.failures += 1,
            }
        }
    }
    println!("startup, {n} runs each, interleaved (ms)");
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>6} {:>8}",
        "", "p50", "p90", "p99", "n", "success"
    );
    let mut all = vec![&bare, &sandboxed];
    if bwrap.is_some() {
        all.push(&bw);
    }
    for s in all {
        let total = s.samples.len() + s.failures;
        println!(
            "{:<44} {:>8.2} {:>8.2} {:>8.2} {:>6} {:>7.1}%",
            s.name,
            s.pct(50.0),
            s.pct(90.0),
            s.pct(99.0),
            total,
            100.0 * s.samples.len() as f64 / total.max(1) as f64
        );
    }
    println!(
        "overhead of ampoule run over bare python (p50): {:+.2} ms",
        sandboxed.pct(50.0) - bare.pct(50.0)
    );
}
