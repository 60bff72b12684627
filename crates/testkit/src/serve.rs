//! A running `ampoule serve`: its port (read from its "listening on" line), its log, SIGTERM.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// What a server wrote to stderr so far, collected by a thread.
#[derive(Debug, Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    /// The text so far.
    pub fn text(&self) -> String {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn push(&self, line: &str) {
        let mut text = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        text.push_str(line);
        text.push('\n');
    }
}

/// Reads a server's `stderr` into a new [`Log`] (echoing each line to the test's stderr when
/// `echo`) and waits up to `within` for its "listening on ADDR" line; answers the log and the
/// port.
pub fn listening(
    stderr: impl Read + Send + 'static,
    echo: bool,
    within: Duration,
) -> Result<(Log, u16), String> {
    let log = Log::default();
    let (tx, rx) = std::sync::mpsc::channel();
    let collected = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if echo {
                eprintln!("serve: {line}");
            }
            collected.push(&line);
            if let Some(addr) = line
                .split("listening on ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
            {
                let _ = tx.send(addr.to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(within)
        .map_err(|_| format!("the server did not start:\n{}", log.text()))?;
    let port = addr
        .rsplit(':')
        .next()
        .and_then(|p| {
            p.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .ok_or_else(|| format!("no port in {addr:?}"))?;
    Ok((log, port))
}

/// `ampoule serve` started by a test, on this machine's loopback (not in a jail). Killed on
/// drop if it is still running.
#[derive(Debug)]
pub struct Serve {
    /// The server process (its stdout is whatever the caller's command set).
    pub child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// Its stderr.
    pub log: Log,
}

impl Serve {
    /// Spawns `cmd` (a configured `ampoule serve --listen 127.0.0.1:0 …`) with stderr piped and
    /// waits up to 60 s for it to listen.
    pub fn spawn(mut cmd: Command, echo: bool) -> Result<Serve, String> {
        let mut child = cmd
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting the server: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        let (log, port) = listening(stderr, echo, Duration::from_secs(60))?;
        Ok(Serve { child, port, log })
    }

    /// SIGTERM, then its exit status (an error after 30 s without one).
    pub fn stop(mut self) -> Result<ExitStatus, String> {
        let pid =
            nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).map_err(|e| e.to_string())?);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| format!("SIGTERM: {e}"))?;
        let t = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Ok(st);
            }
            if t.elapsed() > Duration::from_secs(30) {
                return Err("the server did not stop on SIGTERM".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pids of this server's direct children (the sandbox inits it started).
    pub fn children(&self) -> Vec<u32> {
        let me = self.child.id();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .ok()
                    .and_then(|stat| {
                        stat.rsplit(')')
                            .next()
                            .and_then(|rest| rest.split_whitespace().nth(1))
                            .and_then(|p| p.parse::<u32>().ok())
                    })
                    == Some(me)
            })
            .collect()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
