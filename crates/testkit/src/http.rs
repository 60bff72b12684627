//! A tiny blocking HTTP/1.1 client for `/v1`: one connection per request, a bearer key, JSON
//! in and out. Enough for a test thread that has joined a jail's network namespace, where an
//! async client would need a runtime of its own.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;

/// Requests to `127.0.0.1:port` with `Authorization: Bearer key`.
#[derive(Debug, Clone)]
pub struct Client {
    /// The server's port on 127.0.0.1.
    pub port: u16,
    key: String,
}

impl Client {
    /// A client of the server on `port` using API key `key`.
    pub fn new(port: u16, key: &str) -> Client {
        Client {
            port,
            key: key.to_owned(),
        }
    }

    /// One request with a raw body (sent as `application/json`); the status and the body, as
    /// JSON (`null` when empty, a JSON string when it is not JSON). Waits up to 240 s.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<(u16, Value), String> {
        let port = self.port;
        let io = |e: std::io::Error| format!("{method} {path}: {e}");
        let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(io)?;
        s.set_read_timeout(Some(Duration::from_secs(240)))
            .map_err(io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
             Authorization: Bearer {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            self.key,
            body.len()
        );
        s.write_all(head.as_bytes()).map_err(io)?;
        s.write_all(body).map_err(io)?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).map_err(io)?;
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or("no response head")?;
        let status = String::from_utf8_lossy(&raw[..split])
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status")?;
        let text = &raw[split + 4..];
        let json = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(text)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(text).into_owned()))
        };
        Ok((status, json))
    }

    /// One request with an optional JSON body; the body of a 2xx answer, else an error naming
    /// the request, the status and the body.
    pub fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let (status, v) = self.call(method, path, bytes.as_deref())?;
        if !(200..300).contains(&status) {
            return Err(format!("{method} {path}: {status} {v}"));
        }
        Ok(v)
    }
}
