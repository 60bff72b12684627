//! Recognising what a sandbox sends first: a TLS ClientHello (→ its server name) or an HTTP/1
//! request (→ its `Host`). Pure functions over the bytes read so far; the caller reads more
//! while the answer is [`Sniff::NeedMore`], up to [`MAX_PREFIX`].

use rustls::server::Acceptor;

/// The most bytes read before deciding; a ClientHello or request head larger than this is
/// refused.
pub const MAX_PREFIX: usize = 32 * 1024;

/// What the first bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniff {
    /// Not enough bytes yet.
    NeedMore,
    /// A TLS ClientHello, with its server name when it has one.
    Tls(Option<String>),
    /// An HTTP/1 request head.
    Http {
        /// The `Host` header's value, when there is exactly one.
        host: Option<String>,
        /// The method.
        method: String,
    },
    /// Neither, and why.
    Other(&'static str),
}

/// Classifies `buf`, the first bytes of a connection.
pub fn sniff(buf: &[u8]) -> Sniff {
    match buf.first() {
        None => Sniff::NeedMore,
        // A TLS handshake record.
        Some(0x16) => sniff_tls(buf),
        Some(_) => sniff_http(buf),
    }
}

fn sniff_tls(buf: &[u8]) -> Sniff {
    if buf.len() < 5 {
        return Sniff::NeedMore;
    }
    let mut acceptor = Acceptor::default();
    let mut rest = buf;
    // Feed only what we have: a zero-length read would count as end of stream.
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => return Sniff::Other("a TLS ClientHello that is too large"),
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => Sniff::Tls(accepted.client_hello().server_name().map(str::to_owned)),
        Ok(None) if buf.len() < MAX_PREFIX => Sniff::NeedMore,
        Ok(None) => Sniff::Other("a TLS ClientHello that is too large"),
        Err(_) => Sniff::Other("a malformed TLS ClientHello"),
    }
}

fn sniff_http(buf: &[u8]) -> Sniff {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let mut hosts = req
                .headers
                .iter()
                .filter(|h| h.name.eq_ignore_ascii_case("host"));
            let host = match (hosts.next(), hosts.next()) {
                (Some(h), None) => std::str::from_utf8(h.value).ok().map(str::to_owned),
                _ => None,
            };
            Sniff::Http {
                host,
                method: req.method.unwrap_or_default().to_owned(),
            }
        }
        Ok(httparse::Status::Partial) if buf.len() < MAX_PREFIX => Sniff::NeedMore,
        Ok(httparse::Status::Partial) => Sniff::Other("an HTTP request head that is too large"),
        Err(httparse::Error::TooManyHeaders) => {
            Sniff::Other("an HTTP request with too many headers")
        }
        Err(_) => Sniff::Other("neither HTTP nor TLS"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello for `api.example.com`, produced by rustls's client.
    fn client_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let roots = rustls::RootCertStore::empty();
        let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut conn = rustls::ClientConnection::new(
            Arc::new(cfg),
            rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap(),
        )
        .unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn tls_gives_the_server_name_even_in_pieces() {
        let hello = client_hello("api.example.com");
        assert_eq!(sniff(&hello), Sniff::Tls(Some("api.example.com".into())));
        for cut in [1, 4, 5, 20, hello.len() - 1] {
            assert_eq!(sniff(&hello[..cut]), Sniff::NeedMore, "cut at {cut}");
        }
    }

    #[test]
    fn http_gives_the_host() {
        let req = b"GET /x HTTP/1.1\r\nHost: Example.com:8080\r\nAccept: */*\r\n\r\n";
        assert_eq!(
            sniff(req),
            Sniff::Http {
                host: Some("Example.com:8080".into()),
                method: "GET".into()
            }
        );
        assert_eq!(sniff(&req[..20]), Sniff::NeedMore);
        let two = b"GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n";
        assert!(matches!(sniff(two), Sniff::Http { host: None, .. }));
        let none = b"GET / HTTP/1.0\r\n\r\n";
        assert!(matches!(sniff(none), Sniff::Http { host: None, .. }));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small xorshift generator: deterministic, no dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let hello = client_hello("a.example");
        for round in 0..2000 {
            let len = (next() % 600) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if round % 2 == 0 {
                // Mutate a real ClientHello instead: the interesting inputs are near-valid.
                buf = hello.clone();
                for _ in 0..1 + next() % 8 {
                    let i = (next() as usize) % buf.len();
                    buf[i] = next() as u8;
                }
                buf.truncate(1 + (next() as usize) % buf.len());
            }
            let _ = sniff(&buf);
        }
    }

    #[test]
    fn anything_else_is_other() {
        assert!(matches!(sniff(b"SSH-2.0-OpenSSH_9.2\r\n"), Sniff::Other(_)));
        assert!(matches!(sniff(b"\x00\x01\x02\x03"), Sniff::Other(_)));
        assert!(matches!(
            sniff(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00"),
            Sniff::Other(_)
        ));
        assert_eq!(sniff(b""), Sniff::NeedMore);
    }
}
