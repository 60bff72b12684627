//! The control channel between the supervisor and the sandbox's init processes.
//!
//! A `SOCK_SEQPACKET` socket pair: every message is one JSON datagram (so no framing code), and
//! a message may carry one file descriptor with `SCM_RIGHTS` (the scratch directory). The init
//! side is blocking (it is single-threaded); the supervisor side is async.
//!
//! This is the runtime's internal channel, not the host↔interpreter protocol: it only carries
//! setup and lifecycle messages, never user data.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::sys::socket::{
    AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType, recvmsg,
    sendmsg, socketpair,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

use crate::error::{Error, Result};

/// Largest message we accept.
pub(crate) const MAX_MESSAGE: usize = 256 * 1024;

/// Everything the init process needs to build the sandbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct InitSpec {
    pub(crate) argv: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) cwd: String,
    pub(crate) hostname: String,
    pub(crate) privileged: bool,
    pub(crate) host_uid: u32,
    pub(crate) host_gid: u32,
    pub(crate) sandbox_uid: u32,
    pub(crate) sandbox_gid: u32,
    pub(crate) stage_dir: PathBuf,
    pub(crate) scratch_dir: PathBuf,
    pub(crate) ro_binds: Vec<PathBuf>,
    pub(crate) etc_files: Vec<(String, String)>,
    pub(crate) etc_binds: Vec<String>,
    pub(crate) scratch_bytes: u64,
    pub(crate) scratch_inodes: u64,
    pub(crate) rlimit_nofile: u64,
    pub(crate) rlimit_fsize: u64,
    pub(crate) rlimit_cpu_s: u64,
    pub(crate) rlimit_nproc: Option<u64>,
    /// `RLIMIT_SIGPENDING`, `RLIMIT_MSGQUEUE` and `RLIMIT_MEMLOCK`, when not the supervisor's.
    /// Besides bounding the process, the values in force when the user namespace is created
    /// bound everything below it, per owner (see `crate::ucounts`).
    #[serde(default)]
    pub(crate) rlimit_user: Option<crate::ucounts::UserRlimits>,
    /// The whole uid (= gid) map, when it is more than `sandbox_uid` → `host_uid` (a zygote's:
    /// see `Host::zygote_id_map`). Written by real root: a process may map only its own id.
    #[serde(default)]
    pub(crate) id_map: Vec<crate::host::IdMapping>,
    /// Limits of the new user namespace itself (`/proc/sys/user/NAME`), written once its ids
    /// are mapped: each bounds what one owner below it may hold (see `crate::ucounts`).
    #[serde(default)]
    pub(crate) userns_limits: Vec<(String, u64)>,
    /// Allowlist mode: the sandbox side of the link to the egress gateway.
    #[serde(default)]
    pub(crate) network: Option<crate::network::InitNetwork>,
    /// A CA certificate (PEM) added to the sandbox's trust store (see `network::CA_BUNDLE`).
    #[serde(default)]
    pub(crate) trusted_ca_pem: Option<String>,
    /// The program is a zygote (see `crate::zygote`): it keeps the capabilities of its user
    /// namespace and gets neither Landlock nor seccomp, which each of its children applies.
    #[serde(default)]
    pub(crate) zygote: bool,
    /// A zygote whose children may trust the egress gateway's CA: its root has an empty
    /// `/etc/ampoule` for each child to mount its trust files on (see `crate::zygote`).
    #[serde(default)]
    pub(crate) ca_mount_point: bool,
    /// A disk image to mount as the scratch instead of a tmpfs (see `crate::disk`).
    #[serde(default)]
    pub(crate) scratch_image: Option<PathBuf>,
    /// An OCI image's unpacked root: the sandbox's `/` is an overlay of it (see
    /// `init::image_root`) instead of the host's runtimes.
    #[serde(default)]
    pub(crate) image_root: Option<PathBuf>,
    /// The image root is writable (`SandboxConfig::writable_root`).
    #[serde(default)]
    pub(crate) writable_root: bool,
    /// Pid 1 joins the sandbox's cgroup itself (cgroup v1, or no cgroup), so the outer init
    /// forks it before `Start`, which pid 1 then waits for (see `init::outer`). On cgroup v2
    /// the supervisor moves the outer init, and pid 1 is forked after `Start` to inherit that.
    #[serde(default)]
    pub(crate) early_pid1: bool,
    /// The supervisor's ignored signals, which the init inherited and the program must not
    /// (see `sys::spawn_program`): bit `n - 1` for signal `n`.
    #[serde(default)]
    pub(crate) ignored_signals: u64,
}

/// Supervisor → init.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToInit {
    /// Build the sandbox described here (first message).
    Spec(Box<InitSpec>),
    /// The supervisor has put the inputs in place: start the program. On cgroup v1 the message
    /// carries the sandbox cgroup's `tasks` files, opened by the supervisor, which pid 1
    /// writes `0` to (see init.rs): the supervisor creates the cgroup while the init builds
    /// the root, so neither waits for the other.
    Start,
}

/// Init → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) enum FromInit {
    /// Carries the scratch directory's descriptor.
    Scratch,
    /// The program is about to `exec`; the layers are in place.
    Ready {
        /// Landlock status as the kernel reported it.
        landlock: String,
    },
    /// A setup stage failed; nothing of the user's ran.
    Failed {
        /// The stage.
        stage: String,
        /// The error.
        message: String,
    },
    /// The program exited with this code.
    Exited {
        /// Exit code.
        code: i32,
    },
    /// The program was ended by this signal.
    Signaled {
        /// Signal number.
        signal: i32,
    },
    /// The sandbox's pid 1 itself died from a signal (e.g. the OOM killer or a cgroup kill).
    InitKilled {
        /// Signal number.
        signal: i32,
    },
}

/// Creates the socket pair: (supervisor end, init end). Both are close-on-exec; the init end
/// is moved to descriptor 3 in the child by `pre_exec`.
pub(crate) fn pair() -> Result<(OwnedFd, OwnedFd)> {
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| Error::io("creating the control socket pair", e.into()))
}

fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(msg).map_err(|e| Error::Channel(format!("encode: {e}")))
}

fn decode<T: DeserializeOwned>(buf: &[u8]) -> Result<T> {
    serde_json::from_slice(buf).map_err(|e| Error::Channel(format!("decode: {e}")))
}

/// Sends one datagram carrying `fds`.
pub(crate) fn send_fds(
    fd: RawFd,
    buf: &[u8],
    fds: &[RawFd],
    flags: MsgFlags,
) -> nix::Result<usize> {
    let iov = [IoSlice::new(buf)];
    if fds.is_empty() {
        sendmsg::<()>(fd, &iov, &[], flags, None)
    } else {
        sendmsg::<()>(fd, &iov, &[ControlMessage::ScmRights(fds)], flags, None)
    }
}

/// Receives one datagram and the descriptors it carries; `Ok(None)` on end of stream.
pub(crate) fn recv_fds(fd: RawFd, flags: MsgFlags) -> nix::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    // The datagram's length first (a peek with MSG_TRUNC returns it whole, and leaves the
    // datagram and its descriptors queued), so the buffer is the message's size: a zeroed
    // buffer of MAX_MESSAGE per call cost 64 page faults and a 256 KiB memset, several times
    // on the path of every `ampoule run` (about a third of its extra page faults).
    let len = nix::sys::socket::recv(
        fd,
        &mut [],
        flags | MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
    )?;
    let mut buf = vec![0u8; len.min(MAX_MESSAGE)];
    let mut cmsg = nix::cmsg_space!([RawFd; 16]);
    let (len, received) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = recvmsg::<()>(
            fd,
            &mut iov,
            Some(&mut cmsg),
            flags | MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut received = Vec::new();
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    received.extend(fds);
                }
            }
        }
        (msg.bytes, received)
    };
    let owned: Vec<OwnedFd> = received.into_iter().map(crate::sys::own_fd).collect();
    if len == 0 && owned.is_empty() {
        return Ok(None);
    }
    buf.truncate(len);
    Ok(Some((buf, owned)))
}

/// Blocking end used by the init processes.
pub(crate) struct InitChannel {
    fd: OwnedFd,
}

impl InitChannel {
    /// Wraps the channel and marks it close-on-exec, so the program never inherits it.
    pub(crate) fn new(fd: OwnedFd) -> Self {
        let _ = nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        );
        Self { fd }
    }

    pub(crate) fn send(&self, msg: &FromInit, pass: Option<RawFd>) -> Result<()> {
        self.send_with_fds(msg, pass.as_slice())
    }

    /// Sends `msg` carrying `fds` (the receiver gets them in this order).
    pub(crate) fn send_with_fds(&self, msg: &FromInit, fds: &[RawFd]) -> Result<()> {
        let buf = encode(msg)?;
        send_fds(self.fd.as_raw_fd(), &buf, fds, MsgFlags::MSG_NOSIGNAL)
            .map(drop)
            .map_err(|e| Error::Channel(format!("send: {e}")))
    }

    pub(crate) fn recv(&self) -> Result<ToInit> {
        self.recv_with_fds().map(|(msg, _)| msg)
    }

    /// The next message and the descriptors it carries.
    pub(crate) fn recv_with_fds(&self) -> Result<(ToInit, Vec<OwnedFd>)> {
        loop {
            match recv_fds(self.fd.as_raw_fd(), MsgFlags::empty()) {
                Ok(Some((buf, fds))) => return Ok((decode(&buf)?, fds)),
                Ok(None) => return Err(Error::Channel("supervisor went away".into())),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::Channel(format!("recv: {e}"))),
            }
        }
    }
}

/// Async end used by the supervisor.
#[derive(Debug)]
pub(crate) struct HostChannel {
    fd: AsyncFd<OwnedFd>,
}

impl HostChannel {
    pub(crate) fn new(fd: OwnedFd) -> Result<Self> {
        nix::fcntl::fcntl(
            &fd,
            nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
        )
        .map_err(|e| Error::io("making the control socket non-blocking", e.into()))?;
        Ok(Self {
            fd: crate::sys::register_async(fd)
                .map_err(|e| Error::io("registering the control socket", e))?,
        })
    }

    pub(crate) async fn send(&self, msg: &ToInit) -> Result<()> {
        self.send_with_fds(msg, &[]).await
    }

    /// Sends `msg` with `fds` (duplicated into the receiver).
    pub(crate) async fn send_with_fds(&self, msg: &ToInit, fds: &[RawFd]) -> Result<()> {
        let buf = encode(msg)?;
        loop {
            let mut guard = self
                .fd
                .writable()
                .await
                .map_err(|e| Error::io("control socket", e))?;
            match send_fds(
                self.fd.get_ref().as_raw_fd(),
                &buf,
                fds,
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
            ) {
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::Channel(format!("send: {e}"))),
            }
        }
    }

    /// Next message and its first descriptor (any others are closed); `Ok(None)` when every
    /// init process has exited.
    pub(crate) async fn recv(&self) -> Result<Option<(FromInit, Option<OwnedFd>)>> {
        Ok(self
            .recv_with_fds()
            .await?
            .map(|(msg, fds)| (msg, fds.into_iter().next())))
    }

    /// Next message and every descriptor it carries, in the order sent; `Ok(None)` when every
    /// init process has exited.
    pub(crate) async fn recv_with_fds(&self) -> Result<Option<(FromInit, Vec<OwnedFd>)>> {
        loop {
            let mut guard = self
                .fd
                .readable()
                .await
                .map_err(|e| Error::io("control socket", e))?;
            match recv_fds(self.fd.get_ref().as_raw_fd(), MsgFlags::MSG_DONTWAIT) {
                Ok(Some((buf, fds))) => return Ok(Some((decode(&buf)?, fds))),
                Ok(None) => return Ok(None),
                Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(Error::Channel(format!("recv: {e}"))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_json_shape() {
        let m = FromInit::Failed {
            stage: "mount".into(),
            message: "EPERM".into(),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"Failed":{"stage":"mount","message":"EPERM"}}"#
        );
        assert_eq!(serde_json::to_string(&ToInit::Start).unwrap(), r#""Start""#);
    }

    #[tokio::test]
    async fn a_descriptor_crosses_the_channel() {
        let (host, init) = pair().unwrap();
        let host = HostChannel::new(host).unwrap();
        let init = InitChannel::new(init);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), b"x").unwrap();
        let dirfd = std::fs::File::open(dir.path()).unwrap();
        init.send(&FromInit::Scratch, Some(dirfd.as_raw_fd()))
            .unwrap();
        let (msg, fd) = host.recv().await.unwrap().unwrap();
        assert_eq!(msg, FromInit::Scratch);
        let fd = fd.expect("descriptor passed");
        let st = nix::sys::stat::fstatat(&fd, "marker", nix::fcntl::AtFlags::empty()).unwrap();
        assert_eq!(st.st_size, 1);
        host.send(&ToInit::Start).await.unwrap();
        assert!(matches!(init.recv().unwrap(), ToInit::Start));
        drop(init);
        assert!(host.recv().await.unwrap().is_none());
    }
}
