//! Snapshot of the wire shape: one example of every message, serialized, compared with the
//! committed `tests/wire.snap.jsonl`. A difference means the protocol changed: bump
//! `PROTOCOL_VERSION` if old kernels would misread it, update the kernels, then regenerate
//! the snapshot with `AMPOULE_UPDATE_SNAPSHOTS=1 cargo test -p ampoule-protocol`.

// Helpers of this file are test code too.
#![allow(clippy::unwrap_used)]

use ampoule_protocol::{
    DoneStatus, Event, Execute, MimeBundle, PROTOCOL_VERSION, Request, StreamName, decode, encode,
};
use serde_json::json;

const SNAPSHOT: &str = "tests/wire.snap.jsonl";

fn bundle(pairs: &[(&str, serde_json::Value)]) -> MimeBundle {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

fn requests() -> Vec<Request> {
    vec![
        Request::Execute(Execute {
            id: "e1".into(),
            code: "x = 1\nx + 1".into(),
            inputs: Some(json!({"n": 3}).as_object().cloned().unwrap_or_default()),
            timeout_s: Some(30.0),
        }),
        Request::Execute(Execute {
            id: "e2".into(),
            code: "print('hi')".into(),
            inputs: None,
            timeout_s: None,
        }),
        Request::Interrupt,
    ]
}

fn events() -> Vec<Event> {
    vec![
        Event::Hello {
            protocol_version: PROTOCOL_VERSION,
            language: "python".into(),
            runtime: "CPython 3.11.2".into(),
        },
        Event::Stream {
            id: "e1".into(),
            name: StreamName::Stdout,
            text: "hi\n".into(),
        },
        Event::Stream {
            id: "e1".into(),
            name: StreamName::Stderr,
            text: "warning\n".into(),
        },
        Event::Display {
            id: "e1".into(),
            data: bundle(&[
                ("image/png", json!("iVBORw0KGgo=")),
                ("text/plain", json!("<Figure size 640x480 with 1 Axes>")),
            ]),
        },
        Event::Result {
            id: "e1".into(),
            data: bundle(&[
                ("application/json", json!({"a": [1, 2]})),
                ("text/plain", json!("{'a': [1, 2]}")),
            ]),
            execution_count: 1,
        },
        Event::Error {
            id: "e1".into(),
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec![
                "Traceback (most recent call last):".into(),
                "  File \"<cell 1>\", line 1, in <module>".into(),
                "ZeroDivisionError: division by zero".into(),
            ],
        },
        Event::Done {
            id: "e1".into(),
            status: DoneStatus::Ok,
            execution_count: 1,
            exit_code: None,
        },
        Event::Done {
            id: "e2".into(),
            status: DoneStatus::Error,
            execution_count: 2,
            exit_code: Some(3),
        },
        Event::Done {
            id: "e3".into(),
            status: DoneStatus::Interrupted,
            execution_count: 3,
            exit_code: None,
        },
    ]
}

fn render() -> String {
    let mut out = String::new();
    for r in requests() {
        out.push_str(&serde_json::to_string(&r).unwrap());
        out.push('\n');
    }
    for e in events() {
        out.push_str(&serde_json::to_string(&e).unwrap());
        out.push('\n');
    }
    out
}

#[test]
fn wire_shape_matches_the_snapshot() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SNAPSHOT);
    let now = render();
    if std::env::var_os("AMPOULE_UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &now).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == now,
        "the protocol's wire shape changed.\n--- committed ({SNAPSHOT})\n{committed}\n--- now\n{now}\n\
         If this is deliberate, bump PROTOCOL_VERSION when old kernels would misread it, update \
         kernels/, and run AMPOULE_UPDATE_SNAPSHOTS=1 cargo test -p ampoule-protocol"
    );
}

#[test]
fn snapshot_lines_decode_back_to_the_same_messages() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SNAPSHOT);
    let committed = std::fs::read_to_string(path).unwrap();
    let lines: Vec<&str> = committed.lines().collect();
    let (req_lines, ev_lines) = lines.split_at(requests().len());
    for (line, want) in req_lines.iter().zip(requests()) {
        assert_eq!(decode::<Request>(line.as_bytes()).unwrap(), want);
    }
    for (line, want) in ev_lines.iter().zip(events()) {
        assert_eq!(decode::<Event>(line.as_bytes()).unwrap(), want);
    }
}

#[test]
fn frame_header_is_big_endian_length() {
    let frame = encode(&Request::Interrupt).unwrap();
    assert_eq!(&frame[..4], &[0, 0, 0, 20]);
    assert_eq!(&frame[4..], br#"{"type":"interrupt"}"#.as_slice());
}
