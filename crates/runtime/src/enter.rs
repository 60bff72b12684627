//! Entering a running sandbox: more processes in it ("docker exec"), and TCP connections into
//! its network namespace.
//!
//! A [`Sandbox`](crate::Sandbox) hands out an [`Entrance`]: a pidfd of a process that lives in
//! every namespace of the sandbox (a cold sandbox's pid 1, which sends it with `Ready`; a
//! zygote-born sandbox's program, whose pidfd the zygote already handed over), the sandbox's
//! cgroup, rlimits, host ids and scratch space. An entrance outlives nothing: once that
//! process is gone, the namespaces are going too and [`Entrance::alive`] says so.
//!
//! # A process ([`Entrance::spawn`])
//!
//! The supervisor starts the ampoule binary again as a helper (`ampoule __sandbox-init
//! --enter`: a fresh, single-threaded exec, like the init), with the command's stdio pipes as
//! its own and a `SOCK_SEQPACKET` control socket on descriptor 3, and sends it the spec with
//! the pidfd attached. The helper:
//!
//! 1. asks for `SIGKILL` when the supervisor's thread dies, turns non-dumpable, compiles the
//!    seccomp programs;
//! 2. joins the sandbox's **pid** namespace for its children only (`setns(pidfd,
//!    CLONE_NEWPID)`) and forks. It stays real root in every other host namespace, outside
//!    the sandbox's pid namespace: the code can neither see it in `/proc` nor address it
//!    (signal, ptrace), and it holds nothing the code could want;
//! 3. the **child**, still host root: its own group only (`setgroups`), joins the sandbox's
//!    cgroup (writes `0` to `tasks`/`cgroup.procs`: limits apply to it and all it forks), sets
//!    the sandbox's rlimits, joins the mount, network, ipc, uts and cgroup namespaces — as host
//!    root, since for a zygote-born sandbox they are owned by the zygote's user namespace, over
//!    which the program's own user namespace holds nothing — and only then the program's
//!    **user** namespace; drops the capability bounding set, takes uid/gid
//!    [`SANDBOX_UID`](crate::sandbox::SANDBOX_UID), clears what capabilities were left (the
//!    kernel's root→non-root rule does not fire: host root is unmapped in there), re-arms its
//!    parent-death signal, `setsid`, `chdir`, `no_new_privs`, the same Landlock ruleset as the
//!    init's ([`crate::init::landlock`]), speculative-store-bypass off, the runtime's seccomp
//!    programs, `execve`. An error before `execve` goes back on a close-on-exec pipe;
//! 4. the helper reports the child's pid inside the sandbox (`NSpid` of
//!    `/proc/<child>/status`, read before the child runs any code) and its host pid, then
//!    waits on the child's pidfd and the control socket: signals requested by
//!    [`Entered::signal`] / [`Entered::signal_group`] are delivered by the helper (the
//!    child's pid cannot be reused while it is unreaped, so `kill(-pid)` hits the child's own
//!    process group), and the child's exit status is reported when it ends.
//!
//! Dropping an [`Entered`] that was not waited for kills the command's process group: the
//! control socket's end of stream makes the helper `SIGKILL` the group, reap the child and
//! exit; tokio reaps the helper. If the helper itself dies (the supervisor died), the child
//! gets `SIGKILL` from its parent-death signal, and what it forked dies with the sandbox. No
//! zombie is left: orphans inside are re-parented to the sandbox's pid 1, which reaps.
//!
//! Landlock domains are per `restrict_self`: an entered process is in a domain of its own,
//! a sibling of the program's, with the same rules. Landlock's signal and abstract-socket
//! scopes therefore separate entries from the program and from each other (a command cannot
//! `kill` the kernel, nor a process another entry started; it can its own children). Files,
//! pipes, TCP and path sockets on loopback are shared as usual.
//!
//! # A TCP connection ([`Entrance::connect_tcp`])
//!
//! A dedicated thread (never a pool thread, which would be reused inside the sandbox's
//! network) joins the sandbox's network namespace only, connects to `127.0.0.1:port` with a
//! short timeout and exits; the socket keeps its namespace. No process is started. Needs
//! root (the supervisor joins a namespace its user namespace owns).

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sched::{CloneFlags, setns};
use nix::sys::signal::Signal;
use nix::sys::socket::MsgFlags;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Gid, Pid, Uid};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};

use crate::channel;
use crate::error::{Error, Result};
use crate::init::{INIT_ARG, Rlimits, Stage, StageContext, fail};
use crate::sandbox::{ProgramExit, SANDBOX_UID};
use crate::scratch::Scratch;
use crate::seccomp::SeccompPolicy;
use crate::sys::{self, Fork};

/// With [`INIT_ARG`], makes the process the helper that starts one process in a sandbox.
pub const ENTER_ARG: &str = "--enter";

/// Descriptor of the control socket in the helper.
const CONTROL_FD: RawFd = 3;
/// How long the helper may take to report the command started.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`Entrance::connect_tcp`] waits for the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// What a sandbox knows about entering it; shared by its [`Entrance`]s.
#[derive(Debug)]
pub(crate) struct Target {
    /// A process in every namespace of the sandbox.
    pub(crate) pidfd: OwnedFd,
    /// The ampoule binary (the helper).
    pub(crate) exe: PathBuf,
    /// Files to write `0` to, joining the sandbox's cgroup (`tasks` on v1, `cgroup.procs` on
    /// v2).
    pub(crate) cgroup: Vec<PathBuf>,
    pub(crate) rlimits: Rlimits,
    /// The sandbox's host gid (its processes' only supplementary group).
    pub(crate) host_gid: u32,
    /// The supervisor is real root: namespaces are joined before the user namespace (see the
    /// module docs). Otherwise the user namespace (ours) comes first.
    pub(crate) privileged: bool,
    pub(crate) scratch: Option<Scratch>,
    /// Set when the sandbox is killed or finished.
    pub(crate) over: AtomicBool,
}

/// A cloneable, `Send + Sync` handle to enter a running sandbox; obtained from
/// [`Sandbox::entrance`](crate::Sandbox::entrance).
#[derive(Clone, Debug)]
pub struct Entrance {
    target: Arc<Target>,
}

/// A process to start in a sandbox.
#[derive(Debug, Clone, Default)]
pub struct EnterSpec {
    /// Program and arguments; `argv[0]` is an absolute path inside the sandbox.
    pub argv: Vec<String>,
    /// The complete environment.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    pub cwd: String,
    /// Give the process a stdin pipe (otherwise `/dev/null`).
    pub stdin: bool,
}

/// A process started in a sandbox by [`Entrance::spawn`]. Dropping it without
/// [`Entered::wait`] kills the process and its process group (see the module docs).
#[derive(Debug)]
pub struct Entered {
    /// The process's pid inside the sandbox's pid namespace.
    pub pid: u32,
    /// Its stdin, when [`EnterSpec::stdin`] asked for one.
    pub stdin: Option<ChildStdin>,
    /// Its stdout.
    pub stdout: Option<ChildStdout>,
    /// Its stderr.
    pub stderr: Option<ChildStderr>,
    host_pid: u32,
    control: Arc<AsyncFd<OwnedFd>>,
    helper: tokio::process::Child,
    exit: Option<ProgramExit>,
}

/// Everything the helper needs (JSON on the control socket, with the pidfd attached).
#[derive(Debug, Serialize, Deserialize)]
struct HelperSpec {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    cwd: String,
    cgroup: Vec<PathBuf>,
    rlimits: Rlimits,
    host_gid: u32,
    uid: u32,
    privileged: bool,
}

/// Supervisor → helper.
#[derive(Debug, Serialize, Deserialize)]
enum ToHelper {
    Spec(Box<HelperSpec>),
    /// Deliver `signal` to the process (`group`: to its process group).
    Signal {
        signal: i32,
        group: bool,
    },
}

/// Helper → supervisor.
#[derive(Debug, Serialize, Deserialize)]
enum FromHelper {
    Started { pid: u32, host_pid: u32 },
    Failed { stage: String, message: String },
    Exited { code: i32 },
    Signaled { signal: i32 },
}

impl Target {
    fn alive(&self) -> bool {
        if self.over.load(Ordering::Relaxed) {
            return false;
        }
        // A pidfd turns readable once its process has exited.
        let mut fds = [PollFd::new(self.pidfd.as_fd(), PollFlags::POLLIN)];
        matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(0))
    }
}

impl Entrance {
    pub(crate) fn new(target: Arc<Target>) -> Self {
        Self { target }
    }

    /// Whether the sandbox still runs.
    pub fn alive(&self) -> bool {
        self.target.alive()
    }

    /// A handle on the sandbox's scratch space (`/mnt/data`, `/tmp`), for the host to write
    /// files a process started here will read.
    pub fn scratch(&self) -> Result<Scratch> {
        match &self.target.scratch {
            Some(s) => s.try_clone(),
            None => Err(Error::Invalid("this sandbox has no scratch space".into())),
        }
    }

    fn check_alive(&self) -> Result<()> {
        if self.alive() {
            Ok(())
        } else {
            Err(Error::Invalid("the sandbox is over".into()))
        }
    }

    /// Starts `spec` in the sandbox: same namespaces, cgroup, rlimits, ids and seals as the
    /// sandbox's program (see the module docs). Returns once the command is executing.
    ///
    /// Like [`Sandbox::spawn`](crate::Sandbox::spawn), call it from a thread that outlives the
    /// process (the helper dies with the thread that started it).
    pub async fn spawn(&self, spec: &EnterSpec) -> Result<Entered> {
        self.check_alive()?;
        if spec.argv.is_empty() {
            return Err(Error::Invalid("nothing to run".into()));
        }
        let t = &self.target;
        let msg = ToHelper::Spec(Box::new(HelperSpec {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            cwd: spec.cwd.clone(),
            cgroup: t.cgroup.clone(),
            rlimits: t.rlimits.clone(),
            host_gid: t.host_gid,
            uid: SANDBOX_UID,
            privileged: t.privileged,
        }));
        let buf = serde_json::to_vec(&msg).map_err(|e| Error::Channel(format!("encode: {e}")))?;
        if buf.len() > channel::MAX_MESSAGE {
            return Err(Error::Invalid(format!(
                "the command line and environment take {} bytes, more than {}",
                buf.len(),
                channel::MAX_MESSAGE
            )));
        }
        let (ours, theirs) = channel::pair()?;
        let mut cmd = tokio::process::Command::new(&t.exe);
        cmd.arg(INIT_ARG)
            .arg(ENTER_ARG)
            .env_clear()
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        sys::pass_fd(&mut cmd, theirs.as_raw_fd(), CONTROL_FD);
        let mut helper = cmd
            .spawn()
            .map_err(|e| Error::io(format!("starting {}", t.exe.display()), e))?;
        drop(theirs);
        // A small datagram on a fresh socket: never blocks.
        channel::send_fds(
            ours.as_raw_fd(),
            &buf,
            &[t.pidfd.as_raw_fd()],
            MsgFlags::MSG_NOSIGNAL,
        )
        .map_err(|e| Error::Channel(format!("send to the helper: {e}")))?;
        nix::fcntl::fcntl(
            &ours,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::io("making the control socket non-blocking", e.into()))?;
        let control =
            sys::register_async(ours).map_err(|e| Error::io("registering the helper socket", e))?;
        let started = tokio::time::timeout(START_TIMEOUT, recv::<FromHelper>(&control)).await;
        let (pid, host_pid) = match started {
            Ok(Ok(Some(FromHelper::Started { pid, host_pid }))) => (pid, host_pid),
            Ok(Ok(Some(FromHelper::Failed { stage, message }))) => {
                let _ = helper.wait().await;
                return Err(Error::Setup { stage, message });
            }
            Ok(Ok(other)) => {
                let _ = helper.start_kill();
                let _ = helper.wait().await;
                return Err(Error::Channel(format!(
                    "the helper did not start the process: {other:?}"
                )));
            }
            Ok(Err(e)) => {
                let _ = helper.start_kill();
                let _ = helper.wait().await;
                return Err(e);
            }
            Err(_) => {
                let _ = helper.start_kill();
                let _ = helper.wait().await;
                return Err(Error::Channel("the helper did not start in time".into()));
            }
        };
        Ok(Entered {
            pid,
            stdin: helper.stdin.take(),
            stdout: helper.stdout.take(),
            stderr: helper.stderr.take(),
            host_pid,
            control: Arc::new(control),
            helper,
            exit: None,
        })
    }

    /// Opens a TCP connection to `127.0.0.1:port` in the sandbox's network namespace (where a
    /// server started in it listens). A closed port is an error, never a hang.
    pub async fn connect_tcp(&self, port: u16) -> Result<tokio::net::TcpStream> {
        self.check_alive()?;
        let pidfd = self
            .target
            .pidfd
            .try_clone()
            .map_err(|e| Error::io("duplicating the sandbox's pidfd", e))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A thread of its own that ends here: its network namespace changes for good.
        std::thread::Builder::new()
            .name("ampoule-connect".into())
            .spawn(move || {
                let result = setns(&pidfd, CloneFlags::CLONE_NEWNET)
                    .map_err(|e| Error::io("joining the sandbox's network", e.into()))
                    .and_then(|()| {
                        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                        std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|e| {
                            Error::io(format!("connecting to port {port} in the sandbox"), e)
                        })
                    });
                let _ = tx.send(result);
            })
            .map_err(|e| Error::io("starting a thread", e))?;
        let stream = rx
            .await
            .map_err(|_| Error::Channel("the connecting thread died".into()))??;
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::io("socket", e))?;
        tokio::net::TcpStream::from_std(stream).map_err(|e| Error::io("socket", e))
    }
}

impl Entered {
    /// The process's pid on the host (diagnostics).
    pub fn host_pid(&self) -> u32 {
        self.host_pid
    }

    fn request(&self, signal: i32, group: bool) -> Result<()> {
        if self.exit.is_some() {
            return Err(Error::Invalid("the process has ended".into()));
        }
        self.signaller().request(signal, group)
    }

    /// A handle that signals the process while another task waits for it.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            control: self.control.clone(),
        }
    }

    /// Delivers `signal` to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.request(signal, false)
    }

    /// Delivers `signal` to the process's group (it leads one of its own: it was started with
    /// `setsid`), which holds what it started unless they moved away.
    pub fn signal_group(&self, signal: i32) -> Result<()> {
        self.request(signal, true)
    }

    /// `SIGKILL` to the process and its group. Idempotent.
    pub fn kill(&self) {
        if self.exit.is_none() && self.request(libc::SIGKILL, true).is_err() {
            // The helper does not listen: its death takes the process (parent-death signal).
            if let Some(pid) = self.helper.id() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }

    /// Waits until the process ends. Cancel-safe.
    pub async fn wait(&mut self) -> Result<ProgramExit> {
        if let Some(exit) = self.exit {
            return Ok(exit);
        }
        let exit = loop {
            match recv::<FromHelper>(&self.control).await? {
                Some(FromHelper::Exited { code }) => break ProgramExit::Exited(code),
                Some(FromHelper::Signaled { signal }) => break ProgramExit::Signaled(signal),
                Some(_) => continue,
                None => break ProgramExit::Killed,
            }
        };
        self.exit = Some(exit);
        let _ = self.helper.wait().await;
        Ok(exit)
    }
}

/// Signals an [`Entered`] process from anywhere (see [`Entered::signaller`]); once the
/// process has ended and its helper is gone, every request fails.
#[derive(Debug, Clone)]
pub struct Signaller {
    control: Arc<AsyncFd<OwnedFd>>,
}

impl Signaller {
    fn request(&self, signal: i32, group: bool) -> Result<()> {
        let buf = serde_json::to_vec(&ToHelper::Signal { signal, group })
            .map_err(|e| Error::Channel(format!("encode: {e}")))?;
        channel::send_fds(
            self.control.get_ref().as_raw_fd(),
            &buf,
            &[],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        )
        .map(drop)
        .map_err(|e| Error::Channel(format!("the process's helper is gone: {e}")))
    }

    /// Delivers `signal` to the process.
    pub fn signal(&self, signal: i32) -> Result<()> {
        self.request(signal, false)
    }

    /// Delivers `signal` to the process's group.
    pub fn signal_group(&self, signal: i32) -> Result<()> {
        self.request(signal, true)
    }
}

impl Drop for Entered {
    fn drop(&mut self) {
        // The helper kills the group on the end of stream that follows; tokio reaps it.
        self.kill();
    }
}

async fn recv<T: DeserializeOwned>(sock: &AsyncFd<OwnedFd>) -> Result<Option<T>> {
    loop {
        let mut guard = sock
            .readable()
            .await
            .map_err(|e| Error::io("helper socket", e))?;
        match channel::recv_fds(sock.get_ref().as_raw_fd(), MsgFlags::MSG_DONTWAIT) {
            Ok(Some((buf, _))) => {
                return serde_json::from_slice(&buf)
                    .map(Some)
                    .map_err(|e| Error::Channel(format!("decode: {e}")));
            }
            Ok(None) => return Ok(None),
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
            Err(e) => return Err(Error::Channel(format!("recv: {e}"))),
        }
    }
}

// -- the helper (a fresh exec, single-threaded) -----------------------------------------------

fn send_blocking(fd: &OwnedFd, msg: &FromHelper) {
    if let Ok(buf) = serde_json::to_vec(msg) {
        let _ = channel::send_fds(fd.as_raw_fd(), &buf, &[], MsgFlags::MSG_NOSIGNAL);
    }
}

fn recv_blocking(fd: &OwnedFd) -> Stage<Option<(ToHelper, Vec<OwnedFd>)>> {
    loop {
        match channel::recv_fds(fd.as_raw_fd(), MsgFlags::empty()) {
            Ok(Some((buf, fds))) => {
                let msg = serde_json::from_slice(&buf).stage("channel")?;
                return Ok(Some((msg, fds)));
            }
            Ok(None) | Err(nix::errno::Errno::ECONNRESET) => return Ok(None),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(fail("channel", e.to_string())),
        }
    }
}

/// Entry point of `ampoule __sandbox-init --enter`. Never returns.
pub(crate) fn helper() -> ! {
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() == 1 {
        std::process::exit(111);
    }
    // Our memory belongs to the host's user namespace; nothing of the sandbox's may read it.
    let _ = nix::sys::prctl::set_dumpable(false);
    let _ = sys::close_from(CONTROL_FD as u32 + 1);
    let control = sys::own_fd(CONTROL_FD);
    let _ = nix::fcntl::fcntl(
        &control,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let code = match run_helper(&control) {
        Ok(code) => code,
        Err(e) => {
            send_blocking(
                &control,
                &FromHelper::Failed {
                    stage: e.stage.to_owned(),
                    message: e.message,
                },
            );
            112
        }
    };
    std::process::exit(code)
}

fn run_helper(control: &OwnedFd) -> Stage<i32> {
    let (spec, pidfd) = match recv_blocking(control)? {
        Some((ToHelper::Spec(spec), mut fds)) => match fds.pop() {
            Some(fd) => (*spec, fd),
            None => return Err(fail("channel", "no pidfd with the spec")),
        },
        Some(_) => return Err(fail("channel", "expected the spec first")),
        None => return Ok(0),
    };
    let argv = cstrings(spec.argv.iter().cloned())?;
    let env = cstrings(spec.env.iter().map(|(k, v)| format!("{k}={v}")))?;
    let Some(path) = argv.first().cloned() else {
        return Err(fail("exec", "empty argv"));
    };
    let seccomp = SeccompPolicy::default_policy().stage("seccomp")?;
    // Our children are born in the sandbox's pid namespace; we stay outside it. Without root
    // the sandbox's user namespace (ours) comes first.
    let first = if spec.privileged {
        CloneFlags::CLONE_NEWPID
    } else {
        CloneFlags::CLONE_NEWUSER | CloneFlags::CLONE_NEWPID
    };
    setns(&pidfd, first).stage("setns pid")?;
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).stage("pipe")?;
    match sys::fork().stage("fork")? {
        Fork::Child => {
            drop(err_r);
            let Err(e) = child(&spec, &pidfd, &seccomp, &path, &argv, &env);
            let _ = nix::unistd::write(&err_w, format!("{}\n{}", e.stage, e.message).as_bytes());
            std::process::exit(127)
        }
        Fork::Parent(child) => {
            drop(err_w);
            drop(pidfd);
            supervise(control, child, err_r)
        }
    }
}

fn cstrings(items: impl IntoIterator<Item = String>) -> Stage<Vec<std::ffi::CString>> {
    items
        .into_iter()
        .map(|s| {
            std::ffi::CString::new(s).map_err(|_| fail("exec", "argument contains a NUL byte"))
        })
        .collect()
}

/// The child: from host root to a sealed process of the sandbox. Returns only on failure.
fn child(
    spec: &HelperSpec,
    pidfd: &OwnedFd,
    seccomp: &SeccompPolicy,
    path: &std::ffi::CStr,
    argv: &[std::ffi::CString],
    env: &[std::ffi::CString],
) -> Stage<std::convert::Infallible> {
    use caps::CapSet;
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    // Ignored signals survive `execve`: the command starts with every signal at its default.
    // (Read while the host's `/proc` is still ours.)
    let ignored = sys::ignored_signals();
    if spec.privileged {
        // While still host root: the sandbox's user namespace denies setgroups.
        nix::unistd::setgroups(&[Gid::from_raw(spec.host_gid)]).stage("setgroups")?;
    }
    for file in &spec.cgroup {
        std::fs::write(file, "0").stage("cgroup")?;
    }
    spec.rlimits.apply().stage("rlimit")?;
    let rest = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWCGROUP;
    setns(pidfd, rest).stage("setns")?;
    if spec.privileged {
        setns(pidfd, CloneFlags::CLONE_NEWUSER).stage("setns user")?;
    }
    // Full capabilities in the sandbox's user namespace now: give up what only they allow.
    caps::clear(None, CapSet::Ambient).stage("capabilities")?;
    for cap in caps::all() {
        caps::drop(None, CapSet::Bounding, cap).stage("capabilities")?;
    }
    caps::clear(None, CapSet::Inheritable).stage("capabilities")?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.uid));
    nix::unistd::setresgid(gid, gid, gid).stage("setresgid")?;
    nix::unistd::setresuid(uid, uid, uid).stage("setresuid")?;
    caps::clear(None, CapSet::Effective).stage("capabilities")?;
    caps::clear(None, CapSet::Permitted).stage("capabilities")?;
    // Changing credentials cleared the parent-death signal. Our parent lives outside our pid
    // namespace (getppid() is 0); once it is gone we are pid 1's.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL);
    if nix::unistd::getppid().as_raw() != 0 {
        return Err(fail("supervisor", "the helper exited during set-up"));
    }
    nix::unistd::setsid().stage("setsid")?;
    nix::unistd::chdir(spec.cwd.as_str()).stage("cwd")?;
    nix::sys::prctl::set_no_new_privs().stage("no_new_privs")?;
    crate::init::landlock()?;
    match sys::disable_speculative_store_bypass() {
        Err(e) if e.raw_os_error() != Some(libc::ENXIO) => {
            return Err(fail("speculation", e.to_string()));
        }
        _ => {}
    }
    seccomp.apply().stage("seccomp")?;
    sys::default_signals(ignored);
    let err = nix::unistd::execve(path, argv, env)
        .err()
        .map(|e| e.desc())
        .unwrap_or("exec failed");
    Err(fail(
        "exec",
        format!(
            "{}: {err}",
            spec.argv.first().map(String::as_str).unwrap_or("")
        ),
    ))
}

/// The child's pid in the innermost pid namespace it belongs to.
fn ns_pid(child: Pid) -> Stage<u32> {
    let status = std::fs::read_to_string(format!("/proc/{child}/status")).stage("pid")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| fail("pid", "no NSpid in the child's status"))
}

/// The helper after the fork: reports, relays signals, reports the exit.
fn supervise(control: &OwnedFd, child: Pid, err_r: OwnedFd) -> Stage<i32> {
    // Before anything can reap it, so the pid is the child's. Read before the child runs code.
    let child_fd = sys::pidfd_open(child.as_raw()).stage("pidfd")?;
    let pid = ns_pid(child)?;
    // Only the command holds its stdio pipes now: their end of file is its end.
    crate::init::detach_stdio();
    let mut report = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match nix::unistd::read(&err_r, &mut chunk) {
            Ok(0) => break,
            Ok(n) => report.extend_from_slice(&chunk[..n]),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    drop(err_r);
    if !report.is_empty() {
        let _ = waitpid(child, None);
        let text = String::from_utf8_lossy(&report);
        let (stage, message) = text.split_once('\n').unwrap_or(("exec", &text));
        send_blocking(
            control,
            &FromHelper::Failed {
                stage: stage.to_owned(),
                message: message.to_owned(),
            },
        );
        return Ok(0);
    }
    send_blocking(
        control,
        &FromHelper::Started {
            pid,
            host_pid: child.as_raw() as u32,
        },
    );
    let mut listening = true;
    loop {
        let mut fds = vec![PollFd::new(child_fd.as_fd(), PollFlags::POLLIN)];
        if listening {
            fds.push(PollFd::new(control.as_fd(), PollFlags::POLLIN));
        }
        match nix::poll::poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(fail("poll", e.to_string())),
        }
        let exited = fds[0].any().unwrap_or(false);
        let request = listening && fds.get(1).and_then(PollFd::any).unwrap_or(false);
        if request {
            // The child is not reaped yet, so its pid (and group id) still names it.
            match recv_blocking(control) {
                Ok(Some((ToHelper::Signal { signal, group }, _))) => {
                    if group {
                        if let Ok(sig) = Signal::try_from(signal) {
                            let _ = nix::sys::signal::killpg(child, sig);
                        }
                    } else {
                        let _ = sys::pidfd_signal(child_fd.as_raw_fd(), signal);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    // The supervisor dropped the process (or went away): kill its group.
                    listening = false;
                    let _ = nix::sys::signal::killpg(child, Signal::SIGKILL);
                    let _ = sys::pidfd_kill(child_fd.as_raw_fd());
                }
            }
        }
        if exited {
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => {
                        send_blocking(control, &FromHelper::Exited { code });
                        return Ok(0);
                    }
                    Ok(WaitStatus::Signaled(_, sig, _)) => {
                        send_blocking(control, &FromHelper::Signaled { signal: sig as i32 });
                        return Ok(0);
                    }
                    Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(fail("wait", e.to_string())),
                }
            }
        }
    }
}
