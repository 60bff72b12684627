//! Request by request: plain HTTP always, and TLS for hosts with a credential rule. Here the
//! gateway does not splice bytes but speaks HTTP/1.1 on both sides, checks every request's
//! `Host`, and sets the configured header, if any, on every request.
//!
//! Plain HTTP always goes this way, injection or not: on a spliced connection a second request
//! could name another host served by the same front end (domain fronting); here each request
//! must name the host the connection was checked for. (Inside passed-through TLS the gateway
//! cannot see requests at all; see the threat model.) Upgrades (`ws://`) are not forwarded. For TLS the gateway first completes its own handshake
//! with the upstream server (verified against the system store and the operator's extra CAs),
//! and only then answers the sandbox's ClientHello with a certificate for the same name from
//! its own CA, which the sandbox trusts. A request whose `Host` differs from the name the
//! connection was checked for is refused (421): keep-alive must not carry the credential, or
//! anything else, to a name that was never checked. The secret exists only in this process;
//! the sandbox sends its requests without it and sees the responses.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use ampoule_types::EgressProtocol;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::Shared;
use crate::events::{Decision, EventLog};
use crate::policy::{Credential, Injection, Target, split_host_port};

type Body = BoxBody<Bytes, hyper::Error>;

/// An allowed connection served request by request.
pub(crate) struct Conversation {
    pub(crate) shared: Arc<Shared>,
    pub(crate) log: Arc<EventLog>,
    pub(crate) target: Target,
    pub(crate) port: u16,
    pub(crate) addr: SocketAddr,
    pub(crate) rule: String,
    /// The header to set, for hosts with a credential rule.
    pub(crate) injection: Option<Injection>,
    /// How the sandbox's side of the connection arrived (`Http` or `Tls`).
    pub(crate) protocol: EgressProtocol,
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("ampoule egress gateway: {msg}\n")))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

impl Conversation {
    fn record(&self, protocol: EgressProtocol, allowed: bool, injected: bool, reason: String) {
        self.log.record(Decision {
            host: self.target.as_string(),
            port: self.port,
            protocol,
            allowed,
            reason,
            injected,
            address: Some(self.addr.to_string()),
        });
    }

    /// Plain HTTP.
    pub(crate) async fn http<C>(self, client: C, upstream: TcpStream)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (reason, injected) = match &self.injection {
            Some(i) => (
                format!(
                    "{}; {} injected from {}",
                    self.rule,
                    i.header(),
                    i.describe()
                ),
                true,
            ),
            None => (self.rule.clone(), false),
        };
        self.record(EgressProtocol::Http, true, injected, reason);
        self.exchange(client, upstream).await;
    }

    /// TLS: terminate, verify upstream, then HTTP.
    pub(crate) async fn https<C>(self, client: C, upstream: TcpStream)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let tls = EgressProtocol::Tls;
        let Target::Name(name) = &self.target else {
            // Injection rules name hosts; an address never matches one.
            return;
        };
        let name = name.clone();
        let server_name = match ServerName::try_from(name.clone()) {
            Ok(n) => n,
            Err(e) => return self.record(tls, false, false, format!("bad server name: {e}")),
        };
        let client_cfg = match self.shared.upstream.config() {
            Ok(c) => c,
            Err(e) => return self.record(tls, false, false, e.to_string()),
        };
        let up = match tokio_rustls::TlsConnector::from(client_cfg)
            .connect(server_name, upstream)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let reason = format!("{}, but the upstream's TLS failed: {e}", self.rule);
                return self.record(tls, false, false, reason);
            }
        };
        let server_cfg = match self.shared.authority.server_config(&name) {
            Ok(c) => c,
            Err(e) => return self.record(tls, false, false, e.to_string()),
        };
        let down = match tokio_rustls::TlsAcceptor::from(server_cfg)
            .accept(client)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                let reason = format!(
                    "{}, but the sandbox refused the gateway's certificate: {e}",
                    self.rule
                );
                return self.record(tls, false, false, reason);
            }
        };
        let reason = match &self.injection {
            Some(i) => format!(
                "{}; TLS terminated, {} injected from {}",
                self.rule,
                i.header(),
                i.describe()
            ),
            None => format!("{}; TLS terminated", self.rule),
        };
        self.record(tls, true, self.injection.is_some(), reason);
        self.exchange(down, up).await;
    }

    /// Serves HTTP/1.1 to the sandbox and forwards each request, with the header set, over one
    /// upstream connection.
    async fn exchange<C, U>(self, client: C, upstream: U)
    where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        U: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = match hyper::client::conn::http1::handshake::<_, Incoming>(
            TokioIo::new(upstream),
        )
        .await
        {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upstream HTTP handshake failed");
                return;
            }
        };
        let sender = Arc::new(tokio::sync::Mutex::new(sender));
        let this = Arc::new(self);
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let sender = sender.clone();
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.forward(req, &sender).await) }
        });
        let server = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(client), service);
        // The upstream connection ends once the server (and with it the sender) is gone.
        let (served, _) = tokio::join!(server, conn);
        if let Err(e) = served {
            tracing::debug!(error = %e, "sandbox-side HTTP connection ended");
        }
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        sender: &tokio::sync::Mutex<SendRequest<Incoming>>,
    ) -> Response<Body> {
        let asked = req
            .headers()
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .and_then(split_host_port)
            .and_then(|(h, _)| Target::parse(h));
        if asked.as_ref() != Some(&self.target) {
            let reason = format!(
                "a request for {:?} on a connection checked for {}",
                asked.map(|t| t.as_string()).unwrap_or_default(),
                self.target
            );
            self.log.record(Decision::blocked(
                self.target.as_string(),
                self.port,
                EgressProtocol::Http,
                &reason,
            ));
            return text(StatusCode::MISDIRECTED_REQUEST, reason);
        }
        if let Some(i) = &self.injection {
            let value = match i.credential() {
                Credential::Static { value, .. } => value.clone(),
                Credential::Minted(source) => match source.header_value(&self.shared).await {
                    Ok(v) => v,
                    Err(e) => {
                        let reason = format!("{}: could not be minted: {e}", i.describe());
                        self.log.record(Decision::blocked(
                            self.target.as_string(),
                            self.port,
                            self.protocol,
                            &reason,
                        ));
                        return text(StatusCode::BAD_GATEWAY, reason);
                    }
                },
            };
            req.headers_mut().insert(i.header().clone(), value);
            // One event per request that carried a credential: the record names which one.
            self.record(
                self.protocol,
                true,
                true,
                format!("a request carried {} in {}", i.describe(), i.header()),
            );
        }
        let mut sender = sender.lock().await;
        if sender.ready().await.is_err() {
            return text(StatusCode::BAD_GATEWAY, "the upstream closed".into());
        }
        match sender.send_request(req).await {
            Ok(resp) => resp.map(BodyExt::boxed),
            Err(e) => text(StatusCode::BAD_GATEWAY, format!("upstream: {e}")),
        }
    }
}
