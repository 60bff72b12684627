//! Ports: HTTP to a server listening inside a sandbox, for any door (E2B's `get_host`
//! URLs, the native `/v1/sandboxes/{id}/ports/{port}/…`).
//!
//! The connection is the core's ([`ampoule_core::Manager::connect_port`]: the caller's
//! tenant, the sandbox's own network namespace); this module only speaks HTTP/1.1 over it
//! with hyper's client, one connection per request, and splices upgraded connections
//! (WebSocket) both ways. The caller must already be authorized for the sandbox's ports
//! (E2B: its traffic token): nothing here checks tokens, and nothing reaches the sandbox
//! before [`forward`] is called.

use ampoule_core::{Caller, Error, Manager};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::Response;
use hyper_util::rt::TokioIo;

/// Headers that belong to one hop (RFC 9110 §7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 6] = [
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
];

fn unreachable(port: u16, why: impl std::fmt::Display) -> Error {
    Error::PortUnreachable(format!(
        "nothing answers HTTP on port {port} in the sandbox (the port is not open, or the \
         server there broke the connection): {why}"
    ))
}

/// Sends `req` (path and query kept, `Host: localhost:{port}`) to `port` inside the
/// sandbox and answers its response, streamed. A request to upgrade the connection
/// (WebSocket) is spliced to the sandbox's server once it agrees (101).
pub async fn forward(
    manager: &Manager,
    caller: &Caller,
    sandbox: &str,
    port: u16,
    mut req: Request,
) -> Result<Response, Error> {
    // Held while the connection lives (upgraded ones too): the sandbox is not idle meanwhile.
    let (stream, lease) = manager.connect_port(caller, sandbox, port).await?;
    let lease = std::sync::Arc::new(lease);
    let conn_lease = lease.clone();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(port, e))?;
    tokio::spawn(async move {
        let _lease = conn_lease;
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, port, "port connection ended");
        }
    });
    let wants_upgrade = req.headers().contains_key(header::UPGRADE);
    let client_side = wants_upgrade.then(|| hyper::upgrade::on(&mut req));
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    *req.uri_mut() = Uri::try_from(path).map_err(|e| Error::invalid(format!("bad path: {e}")))?;
    let headers = req.headers_mut();
    for h in HOP_BY_HOP {
        headers.remove(h);
    }
    if let Ok(host) = HeaderValue::from_str(&format!("localhost:{port}")) {
        headers.insert(header::HOST, host);
    }
    let mut resp = sender
        .send_request(req)
        .await
        .map_err(|e| unreachable(port, e))?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS
        && let Some(client_side) = client_side
    {
        let server_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let _lease = lease;
            match tokio::try_join!(client_side, server_side) {
                Ok((client, server)) => {
                    let mut client = TokioIo::new(client);
                    let mut server = TokioIo::new(server);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrading a port connection"),
            }
        });
    }
    Ok(resp.map(Body::new))
}
