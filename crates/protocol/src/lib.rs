//! The protocol between ampoule (the host) and a language kernel inside a sandbox.
//!
//! This crate owns the wire shape of that conversation and nothing else: serde types and the
//! framing, no I/O runtime. The kernels themselves are written in their own languages
//! (`kernels/` at the repository root) and follow the description below; the snapshot test in
//! `tests/wire.rs` pins every message so that a change to the shape is always deliberate.
//!
//! # Framing
//!
//! Every message is one frame: a 4-byte big-endian length, then that many bytes of UTF-8 JSON
//! (one object with a `"type"` field). Requests travel on the kernel's stdin, events on its
//! stdout. A reader refuses frames longer than its limit ([`MAX_FRAME_BYTES`] by default): the
//! kernel runs untrusted code in its own process, so the host treats every frame as hostile
//! input.
//!
//! # Conversation
//!
//! 1. The kernel starts and sends [`Event::Hello`] with [`PROTOCOL_VERSION`]. The host refuses
//!    a kernel that speaks another version.
//! 2. The host sends [`Request::Execute`]. The kernel answers with any number of
//!    [`Event::Stream`] and [`Event::Display`] events, at most one [`Event::Result`] and at most
//!    one [`Event::Error`], and always ends with [`Event::Done`]. Every event carries the
//!    execution's `id`; events with another id are stale (late output of an earlier execution)
//!    and are dropped by the host.
//! 3. [`Request::Interrupt`] asks the kernel to stop the running execution (Python raises
//!    `KeyboardInterrupt`, JavaScript terminates the script, shell sends `SIGINT`). The kernel
//!    then finishes the execution with `done {status: "interrupted"}`. A kernel that does not
//!    answer within the host's grace period is killed.
//!
//! Output of the user's code never shares the event stream unframed: a kernel moves its
//! protocol streams to private descriptors at startup and reads fds 1 and 2 itself.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
// A library prints nothing: the CLI's printer owns stdout and stderr.
#![cfg_attr(not(test), deny(clippy::print_stdout, clippy::print_stderr))]

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The version of this protocol. Bumped on every incompatible change; kernels send it in
/// [`Event::Hello`].
pub const PROTOCOL_VERSION: u32 = 1;

/// The default upper bound on one frame's payload (rich outputs such as PNG plots are the
/// largest frames).
pub const MAX_FRAME_BYTES: usize = 32 * 1024 * 1024;

/// Length of a frame header.
pub const HEADER_BYTES: usize = 4;

/// A framing or decoding failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A frame announced more bytes than the reader accepts.
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    FrameTooLarge {
        /// Announced length.
        len: usize,
        /// The reader's limit.
        max: usize,
    },
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame")]
    Truncated,
    /// The payload is not the JSON of a known message.
    #[error("malformed message")]
    Json(#[from] serde_json::Error),
    /// Reading or writing the stream failed.
    #[error("protocol stream")]
    Io(#[from] std::io::Error),
}

/// A MIME bundle: MIME type to data. Text types carry a string, `application/json` any JSON
/// value, binary types (`image/png`) a base64 string.
pub type MimeBundle = BTreeMap<String, serde_json::Value>;

/// What the host asks of a kernel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Run code against the session's state.
    Execute(Execute),
    /// Stop the running execution, keeping the state when possible.
    Interrupt,
}

/// One piece of code to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Execute {
    /// Chosen by the host; echoed in every event of this execution.
    pub id: String,
    /// Source code.
    pub code: String,
    /// A JSON object made available to the code (Python and JavaScript: the variable
    /// `inputs`; shell: the variable `AMPOULE_INPUTS` holding the JSON text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inputs: Option<serde_json::Map<String, serde_json::Value>>,
    /// The host's deadline for this execution, in seconds (informational: the host enforces
    /// it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
}

/// Which output stream a [`Event::Stream`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamName {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// How an execution ended, as the kernel saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DoneStatus {
    /// Ran to the end.
    Ok,
    /// Raised, failed to compile, or (shell) ended with a non-zero status.
    Error,
    /// Stopped by [`Request::Interrupt`].
    Interrupted,
}

/// What a kernel tells the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// The kernel is ready; always the first frame.
    Hello {
        /// The protocol version the kernel speaks ([`PROTOCOL_VERSION`]).
        protocol_version: u32,
        /// The language plug-in's name (`python`, `javascript`, …).
        language: String,
        /// The runtime and its version, for diagnostics (`CPython 3.11.2`).
        runtime: String,
    },
    /// Text the code wrote to stdout or stderr, as it was produced.
    Stream {
        /// Execution id.
        id: String,
        /// Which stream.
        name: StreamName,
        /// The text (invalid UTF-8 replaced).
        text: String,
    },
    /// A rich output the code displayed (a plot, a table, `display(x)`).
    Display {
        /// Execution id.
        id: String,
        /// The representations of the output.
        data: MimeBundle,
    },
    /// The value of the code's last expression.
    Result {
        /// Execution id.
        id: String,
        /// The representations of the value (always `text/plain`).
        data: MimeBundle,
        /// The execution's number in this session.
        execution_count: u64,
    },
    /// The code failed.
    Error {
        /// Execution id.
        id: String,
        /// Exception or error name (`ZeroDivisionError`, `TypeError`, `ExitStatus`).
        ename: String,
        /// Its message.
        evalue: String,
        /// Traceback lines, pointing at the user's code.
        traceback: Vec<String>,
    },
    /// The execution is over; nothing more comes for this id.
    Done {
        /// Execution id.
        id: String,
        /// How it ended.
        status: DoneStatus,
        /// The execution's number in this session.
        execution_count: u64,
        /// The exit status of the code, for languages that have one (shell).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        exit_code: Option<i32>,
    },
}

impl Event {
    /// The execution id the event belongs to (`None` for [`Event::Hello`]).
    pub fn id(&self) -> Option<&str> {
        match self {
            Event::Hello { .. } => None,
            Event::Stream { id, .. }
            | Event::Display { id, .. }
            | Event::Result { id, .. }
            | Event::Error { id, .. }
            | Event::Done { id, .. } => Some(id),
        }
    }
}

/// Encodes one message as a frame (header and payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let payload = serde_json::to_vec(msg)?;
    let len = u32::try_from(payload.len()).map_err(|_| Error::FrameTooLarge {
        len: payload.len(),
        max: u32::MAX as usize,
    })?;
    let mut frame = Vec::with_capacity(HEADER_BYTES + payload.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&payload);
    Ok(frame)
}

/// Decodes one frame's payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    Ok(serde_json::from_slice(payload)?)
}

/// Writes one message as a frame and flushes.
pub fn write_message<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), Error> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame's payload; `Ok(None)` at a clean end of stream.
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, Error> {
    let mut header = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(Error::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > max {
        return Err(Error::FrameTooLarge { len, max });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Truncated,
        _ => Error::Io(e),
    })?;
    Ok(Some(payload))
}

/// Incremental frame decoder for callers that read the stream in arbitrary chunks (an async
/// reader on the host). Memory stays bounded by the frame limit.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame's payload, if one has arrived. An oversized frame is an error
    /// as soon as its header is seen, before its payload is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, Error> {
        let Some(header) = self.buf.first_chunk::<HEADER_BYTES>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*header) as usize;
        if len > self.max {
            return Err(Error::FrameTooLarge { len, max: self.max });
        }
        if self.buf.len() < HEADER_BYTES + len {
            return Ok(None);
        }
        let payload = self.buf[HEADER_BYTES..HEADER_BYTES + len].to_vec();
        self.buf.drain(..HEADER_BYTES + len);
        Ok(Some(payload))
    }

    /// Whether a partial frame is buffered (the stream ended mid-frame if it ends now).
    pub fn has_partial(&self) -> bool {
        !self.buf.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: &str) -> Event {
        Event::Done {
            id: id.into(),
            status: DoneStatus::Ok,
            execution_count: 1,
            exit_code: None,
        }
    }

    #[test]
    fn frames_round_trip_through_the_sync_reader() {
        let mut wire = Vec::new();
        write_message(&mut wire, &done("a")).unwrap();
        write_message(&mut wire, &Request::Interrupt).unwrap();
        let mut r = wire.as_slice();
        let ev: Event = decode(&read_frame(&mut r, MAX_FRAME_BYTES).unwrap().unwrap()).unwrap();
        assert_eq!(ev, done("a"));
        let req: Request = decode(&read_frame(&mut r, MAX_FRAME_BYTES).unwrap().unwrap()).unwrap();
        assert_eq!(req, Request::Interrupt);
        assert!(read_frame(&mut r, MAX_FRAME_BYTES).unwrap().is_none());
    }

    #[test]
    fn decoder_handles_split_and_joined_chunks() {
        let mut wire = encode(&done("x")).unwrap();
        wire.extend(encode(&done("y")).unwrap());
        let mut dec = FrameDecoder::new(MAX_FRAME_BYTES);
        let mut ids = Vec::new();
        for b in &wire {
            dec.push(std::slice::from_ref(b));
            while let Some(p) = dec.next_frame().unwrap() {
                let ev: Event = decode(&p).unwrap();
                ids.push(ev.id().unwrap().to_owned());
            }
        }
        assert_eq!(ids, ["x", "y"]);
        assert!(!dec.has_partial());
    }

    #[test]
    fn oversized_and_truncated_frames_are_refused() {
        let mut dec = FrameDecoder::new(10);
        dec.push(&[0, 0, 0, 11]);
        assert!(matches!(
            dec.next_frame(),
            Err(Error::FrameTooLarge { len: 11, max: 10 })
        ));
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_BYTES),
            Err(Error::FrameTooLarge { .. })
        ));
        let mut r: &[u8] = &[0, 0, 0, 5, b'{'];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_BYTES),
            Err(Error::Truncated)
        ));
        let mut r: &[u8] = &[0, 0];
        assert!(matches!(
            read_frame(&mut r, MAX_FRAME_BYTES),
            Err(Error::Truncated)
        ));
    }

    #[test]
    fn unknown_messages_are_errors_not_panics() {
        assert!(decode::<Event>(br#"{"type":"launch_missiles"}"#).is_err());
        assert!(decode::<Event>(b"\xff\xfe").is_err());
        assert!(decode::<Request>(br#"{"type":"execute"}"#).is_err());
    }
}
