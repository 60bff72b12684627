//! Sessions forked from a Python zygote: they behave like sessions started from scratch, start
//! with the zygote's packages imported, and share nothing with their siblings.

use ampoule_runtime::{Host, Zygote};
use ampoule_session::Session;
use ampoule_types::{ExecutionStatus, LimitKind, Limits};
use libtest_mimic::Failed;

use crate::{Case, chain, check, run};

async fn zygote(host: &Host) -> Result<Zygote, Failed> {
    let preload: Vec<String> = ampoule_session::zygote::DEFAULT_PRELOAD
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    ampoule_session::zygote::start_python(host, &preload, 64)
        .await
        .map_err(|e| Failed::from(format!("starting the zygote: {}", chain(&e))))
}

async fn fork(host: &Host, z: &Zygote, limits: Limits) -> Result<Session, Failed> {
    Session::start_forked(host, z, limits)
        .await
        .map_err(|e| Failed::from(format!("forking a session: {}", chain(&e))))
}

fn stdout_of(out: &ampoule_session::ExecutionResult) -> String {
    out.stdout.trim().to_owned()
}

/// The pool's warm-up runs in the zygote before it forks: what it imports and initialises is
/// there in every session, its variables are not, and a failing warm-up is reported, not fatal.
/// The zygote filled its heap's holes when it runs on one malloc heap.
async fn warmup_runs_before_the_fork(host: Host) -> Result<(), Failed> {
    let warmup = "import colorsys, sys\nWARM = 41\nsys.ampoule_warm_marker = True\nraise ValueError('half-way')";
    let z = ampoule_session::zygote::start_python_in(&host, &[], warmup, 4, None)
        .await
        .map_err(|e| Failed::from(format!("starting the zygote: {}", chain(&e))))?;
    check!(
        z.info()
            .failed
            .iter()
            .any(|f| f == "warmup: ValueError: half-way"),
        z.info()
    );
    let mut s = fork(&host, &z, Limits::default()).await?;
    let out = run(
        &mut s,
        "import sys\nprint('colorsys' in sys.modules, getattr(sys, 'ampoule_warm_marker', False), 'WARM' in globals())",
    )
    .await?;
    check!(stdout_of(&out) == "True True False", out);
    // The default warm-up (a DataFrame, an array, a chart) on the default preloads: nothing
    // fails, and the heap's holes were taken where the zygote runs on malloc's heap.
    let z = zygote(&host).await?;
    check!(z.info().failed.is_empty(), z.info());
    let malloc = ampoule_session::zygote::huge_pages_split_on_write();
    check!(!malloc || z.info().holes_kib > 0, z.info());
    let mut s = fork(&host, &z, Limits::default()).await?;
    let out = run(
        &mut s,
        "import pandas as pd\nint(pd.DataFrame({'a': range(100)}).a.sum())",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    Ok(())
}

/// Packages are already imported, state persists, and the session is sealed like any other.
async fn preloaded_and_sealed(host: Host) -> Result<(), Failed> {
    let z = zygote(&host).await?;
    check!(z.info().failed.is_empty(), z.info());
    // It learnt which of its pages a new session writes first (its spares copy them ahead).
    check!(z.info().hot_kib > 0, z.info());
    // Single-threaded when it forks (BLAS, OpenMP and pyarrow's jemalloc start no thread).
    check!(z.info().threads == 1, z.info());
    let mut s = fork(&host, &z, Limits::default()).await?;
    let out = run(
        &mut s,
        "import sys\nprint('pandas' in sys.modules, 'matplotlib.pyplot' in sys.modules)",
    )
    .await?;
    check!(stdout_of(&out) == "True True", out);
    let out = run(
        &mut s,
        "import pandas as pd\nx = pd.Series([1, 2, 3]).sum()\nx",
    )
    .await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    let out = run(&mut s, "print(x * 2)").await?;
    check!(stdout_of(&out) == "12", out);
    // Identity and namespaces: pid 2 of its own pid namespace (pid 1 is the reaper), the
    // sandbox user, no capabilities, no network but loopback, its own hostname.
    let out = run(
        &mut s,
        r#"
import os, socket
caps = [l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]
print(os.getpid(), os.getuid(), os.getgid(), caps, socket.gethostname())
print(sorted(os.listdir('/sys/class/net')) if os.path.isdir('/sys/class/net') else ['lo'])
print(open('/proc/self/status').read().split('NoNewPrivs:')[1].split()[0], open('/proc/self/status').read().split('Seccomp:')[1].split()[0])
"#,
    )
    .await?;
    let lines: Vec<&str> = out.stdout.lines().collect();
    check!(
        lines.first().copied()
            == Some(
                "2 1000 1000 ['0000000000000000', '0000000000000000', '0000000000000000'] sandbox"
            ),
        out
    );
    check!(lines.get(2).copied() == Some("1 2"), out);
    // The supervisor's side of /mnt/data (uploads) works on a forked session's scratch, which
    // its own user namespace mounted.
    use std::io::Write as _;
    s.scratch()
        .write(ampoule_runtime::scratch::DATA, "in/one.txt", b"one", 0o644)
        .map_err(|e| Failed::from(format!("write: {}", chain(&e))))?;
    let mut upload = s
        .scratch()
        .create(ampoule_runtime::scratch::DATA, "two.txt", 0o644)
        .map_err(|e| Failed::from(format!("create: {e}")))?;
    upload
        .file()
        .write_all(b"two")
        .map_err(|e| Failed::from(e.to_string()))?;
    upload
        .commit()
        .map_err(|e| Failed::from(format!("commit: {e}")))?;
    let out = run(
        &mut s,
        "import os\nprint(open('/mnt/data/in/one.txt').read(), open('/mnt/data/two.txt').read(), os.stat('/mnt/data/two.txt').st_uid)\nopen('/mnt/data/two.txt', 'a').write('!')",
    )
    .await?;
    check!(stdout_of(&out) == "one two 1000", out);
    // Landlock: nothing outside the scratch directories is writable.
    let out = run(
        &mut s,
        r#"
for p in ('/etc/x', '/usr/x', '/run/ampoule/x'):
    try:
        open(p, 'w'); print('WROTE', p)
    except OSError as e:
        print('no', e.errno)
open('/mnt/data/ok', 'w').write('y'); print('data ok')
"#,
    )
    .await?;
    check!(
        !out.stdout.contains("WROTE") && out.stdout.contains("data ok"),
        out
    );
    Ok(())
}

/// Siblings get their own random state, files, processes and /tmp.
async fn siblings_share_nothing(host: Host) -> Result<(), Failed> {
    let z = zygote(&host).await?;
    let mut a = fork(&host, &z, Limits::default()).await?;
    let mut b = fork(&host, &z, Limits::default()).await?;
    let code = "import os, random, numpy, uuid, tempfile\n\
                print(random.random(), numpy.random.rand(), uuid.uuid4(), \
                os.path.basename(tempfile.mktemp()))";
    let ra = run(&mut a, code).await?;
    let rb = run(&mut b, code).await?;
    check!(
        ra.status == ExecutionStatus::Succeeded && !ra.stdout.is_empty(),
        ra
    );
    let (la, lb): (Vec<&str>, Vec<&str>) = (
        ra.stdout.split_whitespace().collect(),
        rb.stdout.split_whitespace().collect(),
    );
    check!(la.len() == 4 && lb.len() == 4, (ra, rb));
    for i in 0..4 {
        check!(la[i] != lb[i], (&ra.stdout, &rb.stdout));
    }
    run(
        &mut a,
        "open('/mnt/data/secret', 'w').write('a'); open('/tmp/secret', 'w').write('a')\nimport subprocess\np = subprocess.Popen(['sleep', '60'])",
    )
    .await?;
    let out = run(
        &mut b,
        r#"
import os
print(os.path.exists('/mnt/data/secret'), os.path.exists('/tmp/secret'))
print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))
"#,
    )
    .await?;
    check!(out.stdout.starts_with("False False\n[1, 2]"), out);
    // Each runs as a host uid of its own (its slot's): the kernel's per-user counters are its
    // own, and pid 1 (the zygote's uid) is not the code's.
    let ids = "print(open('/proc/self/uid_map').read().split(), os.stat('/proc/1').st_uid)";
    let (ia, ib) = (run(&mut a, ids).await?, run(&mut b, ids).await?);
    let fields = |o: &ampoule_session::ExecutionResult| -> Vec<String> {
        o.stdout.split_whitespace().map(str::to_owned).collect()
    };
    let (fa, fb) = (fields(&ia), fields(&ib));
    check!(
        fa.len() == 4 && fb.len() == 4 && fa[0] == "['1000'," && fa[1] != fb[1],
        (&ia.stdout, &ib.stdout)
    );
    // pid 1 belongs to nobody mapped here (65534), not to the code's 1000.
    check!(fa[3] == "65534", &ia.stdout);
    // Pid 1 is the reaper: not the code's, and closed to it.
    let out = run(
        &mut b,
        r#"
import os
for what in ('/proc/1/environ', '/proc/1/mem', '/proc/1/ns/mnt'):
    try:
        open(what, 'rb').read(1); print('READ', what)
    except OSError as e:
        print('no', e.errno)
"#,
    )
    .await?;
    check!(
        !out.stdout.contains("READ") && out.stdout.contains("no"),
        out
    );
    // And it holds nothing: no capability in any set (its bounding set too, emptied before its
    // sealed re-execution), no_new_privs, not dumpable.
    let out = run(
        &mut b,
        r#"
fields = dict(l.split(':\t', 1) for l in open('/proc/1/status').read().splitlines() if ':\t' in l)
print(sorted((k, v.strip()) for k, v in fields.items() if k.startswith('Cap') or k == 'NoNewPrivs'))
"#,
    )
    .await?;
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        check!(
            out.stdout
                .contains(&format!("('{set}', '0000000000000000')")),
            (set, &out.stdout)
        );
    }
    check!(out.stdout.contains("('NoNewPrivs', '1')"), &out.stdout);
    Ok(())
}

/// Limits hold in a forked session: memory is killed by the cgroup, and the session reports it.
async fn limits_hold(host: Host) -> Result<(), Failed> {
    let z = zygote(&host).await?;
    let limits = Limits {
        memory_mib: 128,
        ..Limits::default()
    };
    let mut s = fork(&host, &z, limits).await?;
    let out = run(
        &mut s,
        "x = bytearray(400 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])",
    )
    .await;
    let out = match out {
        Ok(out) => out,
        Err(e) => return Err(e),
    };
    check!(out.limit == Some(LimitKind::Memory), out);
    // The zygote survives its child's death and forks again.
    let mut again = fork(&host, &z, Limits::default()).await?;
    let out = run(&mut again, "1 + 1").await?;
    check!(out.status == ExecutionStatus::Succeeded, out);
    Ok(())
}

pub(crate) fn cases() -> Vec<Case> {
    vec![
        Case::new(
            "python",
            "zygote_preloaded_and_sealed",
            preloaded_and_sealed,
        )
        .needs_packages(),
        Case::new(
            "python",
            "zygote_siblings_share_nothing",
            siblings_share_nothing,
        )
        .needs_packages(),
        Case::new("python", "zygote_limits_hold", limits_hold).needs_packages(),
        Case::new(
            "python",
            "zygote_warmup_runs_before_the_fork",
            warmup_runs_before_the_fork,
        )
        .needs_packages(),
    ]
}
