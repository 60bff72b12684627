//! Credentials minted at the edge: OAuth 2.0 client-credentials tokens (RFC 6749 §4.4) that
//! an injection rule adds as `Authorization: Bearer <token>` instead of a static value.
//!
//! A [`TokenSource`] belongs to one compiled rule of one pool's policy: every sandbox of that
//! pool shares its cache, no other pool sees it. The client id and secret are read from the
//! server's environment when the policy is compiled and stay in this process, like a static
//! value; the token is requested by the gateway itself (`fetch.rs`: from the host, never
//! through a sandbox's link or policy), kept until shortly before it expires and then
//! requested again on the next request that needs it. One refresh at a time: concurrent
//! requests wait for it rather than each asking the token endpoint.

use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde::Deserialize;

use crate::Shared;
use crate::fetch::{self, Endpoint};

/// Largest token response read.
const MAX_RESPONSE: usize = 64 * 1024;
/// How long a token is kept when the endpoint does not say (`expires_in` is only recommended).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// A token is refreshed this long before it expires at most…
const MAX_MARGIN: Duration = Duration::from_secs(60);

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the id and secret (form-encoded first, as the RFC says); every
    /// server must support it.
    #[default]
    Basic,
    /// `client_id` and `client_secret` as form fields of the body.
    Body,
}

/// `oauth2 = { token_url, client_id_env, client_secret_env, scope, client_auth }` on an
/// injection rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Rule {
    /// The token endpoint (`https://…`; `http://` only for tests and private networks).
    pub token_url: String,
    /// The environment variable of the ampoule process holding the client id.
    pub client_id_env: String,
    /// The environment variable of the ampoule process holding the client secret.
    pub client_secret_env: String,
    /// The scope to ask for (space-separated), if any.
    #[serde(default)]
    pub scope: Option<String>,
    /// How to present the client's credentials; HTTP Basic by default.
    #[serde(default)]
    pub client_auth: ClientAuth,
}

/// A token and when to stop using it.
struct Cached {
    value: HeaderValue,
    refresh_at: Instant,
}

/// One rule's token endpoint, client credentials and cached token. Its `Debug` shows neither
/// the secret nor the token.
pub struct TokenSource {
    endpoint: Endpoint,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    auth: ClientAuth,
    /// Names the credential in events and records: `oauth2:<client_id_env>`.
    name: String,
    cache: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("token_url", &self.endpoint.url())
            .field("credential", &self.name)
            .finish_non_exhaustive()
    }
}

/// The token endpoint's success response (RFC 6749 §5.1); other fields are ignored.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

impl TokenSource {
    /// Checks the rule and reads the client's credentials through `env`.
    pub(crate) fn new(
        rule: &OAuth2Rule,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<Self, String> {
        let endpoint = Endpoint::parse(&rule.token_url).map_err(|e| format!("token_url: {e}"))?;
        let read = |var: &str| {
            env(var)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("the environment variable {var} is not set"))
        };
        Ok(Self {
            endpoint,
            client_id: read(&rule.client_id_env)?,
            client_secret: read(&rule.client_secret_env)?,
            scope: rule.scope.clone().filter(|s| !s.trim().is_empty()),
            auth: rule.client_auth,
            name: format!("oauth2:{}", rule.client_id_env),
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// `oauth2:<client_id_env>`: what events and audit records name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The header value to send now: the cached token while it is fresh, a new one otherwise.
    pub(crate) async fn header_value(&self, shared: &Shared) -> Result<HeaderValue, String> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.value.clone());
        }
        let (value, lifetime) = self.request(shared).await?;
        *cache = Some(Cached {
            value: value.clone(),
            refresh_at: Instant::now() + usable_for(lifetime),
        });
        Ok(value)
    }

    async fn request(&self, shared: &Shared) -> Result<(HeaderValue, Duration), String> {
        let mut form = form_urlencoded(&[("grant_type", "client_credentials")]);
        if let Some(scope) = &self.scope {
            form.push('&');
            form.push_str(&form_urlencoded(&[("scope", scope)]));
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::ACCEPT,
            HeaderValue::from_static("application/json"),
        );
        match self.auth {
            ClientAuth::Basic => {
                // RFC 6749 §2.3.1: both are form-encoded before they are joined.
                let user = form_urlencoded_value(&self.client_id);
                let pass = form_urlencoded_value(&self.client_secret);
                let b64 =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
                let mut v = HeaderValue::from_str(&format!("Basic {b64}"))
                    .map_err(|_| "the client credentials cannot be sent".to_owned())?;
                v.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, v);
            }
            ClientAuth::Body => {
                form.push('&');
                form.push_str(&form_urlencoded(&[
                    ("client_id", &self.client_id),
                    ("client_secret", &self.client_secret),
                ]));
            }
        }
        let resp = fetch::send(
            shared,
            Method::POST,
            &self.endpoint,
            headers,
            Some(("application/x-www-form-urlencoded", Bytes::from(form))),
        )
        .await
        .map_err(|e| format!("token endpoint {}: {e}", self.endpoint.url()))?;
        let status = resp.status();
        let body = fetch::read_body(resp, MAX_RESPONSE)
            .await
            .map_err(|e| format!("token endpoint {}: {e}", self.endpoint.url()))?;
        if !status.is_success() {
            // The error response (§5.2) names the problem and holds no token.
            return Err(format!(
                "token endpoint {} refused: {}",
                self.endpoint.url(),
                fetch::excerpt(status, &body)
            ));
        }
        parse_token(&body).map_err(|e| format!("token endpoint {}: {e}", self.endpoint.url()))
    }
}

/// The header value and the lifetime of a token response.
fn parse_token(body: &[u8]) -> Result<(HeaderValue, Duration), String> {
    let t: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("not a token response: {e}"))?;
    if let Some(kind) = &t.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(format!("token type {kind:?} is not Bearer"));
    }
    if t.access_token.is_empty() {
        return Err("an empty access_token".into());
    }
    let mut value = HeaderValue::from_str(&format!("Bearer {}", t.access_token))
        .map_err(|_| "the access_token holds characters a header cannot carry".to_owned())?;
    value.set_sensitive(true);
    // Some servers send the number as a string.
    let secs = match &t.expires_in {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    };
    let lifetime = match secs {
        Some(s) if s.is_finite() && s > 0.0 => Duration::from_secs_f64(s.min(86_400.0 * 365.0)),
        Some(_) => Duration::ZERO,
        None => DEFAULT_LIFETIME,
    };
    Ok((value, lifetime))
}

/// How long a token that lives `lifetime` is used: until a quarter of its life (at most a
/// minute) is left, so a request never leaves with a token about to expire, and a short-lived
/// token is still used more than once.
fn usable_for(lifetime: Duration) -> Duration {
    lifetime.saturating_sub((lifetime / 4).min(MAX_MARGIN))
}

fn form_urlencoded_value(s: &str) -> String {
    // application/x-www-form-urlencoded: unreserved characters stay, space is `+`.
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn form_urlencoded(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", form_urlencoded_value(k), form_urlencoded_value(v)))
        .collect::<Vec<_>>()
        .join("&")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses_parse() {
        let (v, life) =
            parse_token(br#"{"access_token":"abc","token_type":"bearer","expires_in":3600}"#)
                .unwrap();
        assert_eq!(v, "Bearer abc");
        assert!(v.is_sensitive());
        assert_eq!(life, Duration::from_secs(3600));
        let (_, life) = parse_token(br#"{"access_token":"abc","expires_in":"2"}"#).unwrap();
        assert_eq!(life, Duration::from_secs(2));
        let (_, life) = parse_token(br#"{"access_token":"abc"}"#).unwrap();
        assert_eq!(life, DEFAULT_LIFETIME);
        for bad in [
            &br#"{"access_token":"abc","token_type":"mac"}"#[..],
            br#"{"access_token":""}"#,
            br#"{"error":"invalid_client"}"#,
            br#"{"access_token":"a\nb"}"#,
            b"not json",
        ] {
            assert!(
                parse_token(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn tokens_are_refreshed_before_they_expire() {
        assert_eq!(
            usable_for(Duration::from_secs(3600)),
            Duration::from_secs(3540)
        );
        assert_eq!(
            usable_for(Duration::from_secs(2)),
            Duration::from_millis(1500)
        );
        assert_eq!(usable_for(Duration::ZERO), Duration::ZERO);
    }

    #[test]
    fn form_encoding() {
        assert_eq!(
            form_urlencoded(&[
                ("grant_type", "client_credentials"),
                ("scope", "read write:x")
            ]),
            "grant_type=client_credentials&scope=read+write%3Ax"
        );
    }

    #[test]
    fn missing_credentials_are_config_errors_and_debug_hides_them() {
        let rule = OAuth2Rule {
            token_url: "https://auth.test/token".into(),
            client_id_env: "ID".into(),
            client_secret_env: "SECRET".into(),
            scope: Some("api".into()),
            client_auth: ClientAuth::Basic,
        };
        let err = TokenSource::new(&rule, &|k| (k == "ID").then(|| "me".into())).unwrap_err();
        assert!(err.contains("SECRET"), "{err}");
        let src = TokenSource::new(&rule, &|k| Some(format!("{k}-v4lue"))).unwrap();
        assert_eq!(src.name(), "oauth2:ID");
        assert!(!format!("{src:?}").contains("v4lue"));
        let mut bad = rule;
        bad.token_url = "ftp://auth.test/".into();
        assert!(TokenSource::new(&bad, &|_| Some("x".into())).is_err());
    }
}
