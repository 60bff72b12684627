//! Bearer API keys, the tenants they belong to, their lifecycle, and the throttle on failed
//! authentications.
//!
//! Keys come from two places: the config's `[[auth.keys]]` (or the key generated on first
//! start) and the keys file that `ampoule keys add|revoke|rotate` edits ([`keyfile`]), which
//! the server reads again whenever it changes ([`Keys::reload`]) — so keys are added, rotated
//! and revoked without a restart. A key of the file may expire (`expires_at`; a rotated key
//! expires at the end of its grace period) or be revoked; either answers 401 with its own
//! code (`key_expired`, `key_revoked`).
//!
//! Failed authentications (an unknown, expired or revoked key) are counted per client address
//! (IPv6 by /64) and per key prefix (the first [`PREFIX_CHARS`] characters of the presented
//! key) in a fixed one-minute window: past `[auth] max_failures_per_minute`, every request from
//! that address that carries a key, and every key with that prefix, is answered 429
//! `auth_throttled` with `Retry-After` until the window ends, without looking the key up (a
//! request with no key at all stays a plain 401: it guesses nothing). The first refusal of each
//! window is reported ([`AuthEvent::Throttled`]) and written to the audit log.
//!
//! Invariants: keys exist here only as SHA-256 digests; a request's key is hashed and looked
//! up, never compared in clear. Placeholder tokens that buggy clients send (`Bearer None`,
//! empty) are refused like any unknown key, with a message that says what happened. A key's
//! id (first 12 hex digits of its digest) is the only name of a key that leaves this module.

pub mod keyfile;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::FromRequestParts;
use axum::http::{Extensions, HeaderMap, header, request::Parts};

use crate::AppState;
use crate::config::sha256_hex;
use crate::error::{ApiError, ErrorCode};

/// How many leading characters of a presented key name its prefix for the throttle. Keys
/// that ampoule mints are `amp_` and 48 hex digits: 12 characters hold 32 random bits, so
/// nobody can aim failures at the prefix of a key they do not know.
pub const PREFIX_CHARS: usize = 12;

/// The throttle's window.
const WINDOW: Duration = Duration::from_secs(60);

/// Most addresses and prefixes tracked at once. Past it, new ones share one window (so a
/// flood from many addresses is throttled as one, and the table cannot grow without bound).
const MAX_TRACKED: usize = 65_536;

/// The client's address, put in every request's extensions by the listener
/// ([`crate::listener`]). Absent in tests that call the router directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub std::net::SocketAddr);

/// One key as the server knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyEntry {
    /// The tenant it belongs to.
    pub tenant: String,
    /// Its non-secret id: the first 12 hex digits of its SHA-256.
    pub id: String,
    /// When it stops working (seconds since the epoch).
    pub expires_at: Option<u64>,
    /// When it was revoked.
    pub revoked_at: Option<u64>,
    /// The key that replaced it, when it was rotated.
    pub replaced_by: Option<String>,
    /// Whether it decides approvals (and submits no work).
    pub approver: bool,
}

impl KeyEntry {
    /// A key of `tenant` with digest `digest`, valid until revoked.
    pub fn new(digest: &str, tenant: impl Into<String>) -> Self {
        Self {
            tenant: tenant.into(),
            id: key_id(digest),
            expires_at: None,
            revoked_at: None,
            replaced_by: None,
            approver: false,
        }
    }
}

/// The id of the key with SHA-256 `digest` (hex).
pub fn key_id(digest: &str) -> String {
    digest.get(..12).unwrap_or(digest).to_ascii_lowercase()
}

/// What the authentication saw, for metrics and the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuthEvent {
    /// A key was refused (`unauthorized`, `key_expired`, `key_revoked`).
    Failed(ErrorCode),
    /// A request was answered 429 because its address or its key prefix is throttled; `first`
    /// for the first such answer of the window.
    Throttled {
        /// `address` or `key_prefix`.
        by: &'static str,
        /// The client's address, when known.
        client: Option<IpAddr>,
        /// The SHA-256 (first 12 hex digits) of the key prefix, when `by` is `key_prefix`:
        /// the prefix of a real key is part of a secret, so it is never written down.
        prefix_digest: Option<String>,
        /// Failures counted in the window.
        failures: u32,
        /// Whether this is the window's first refusal.
        first: bool,
        /// The refused request's id.
        request_id: Option<String>,
    },
}

type Hook = Arc<dyn Fn(AuthEvent) + Send + Sync>;

/// The API keys and the throttle (shared by every door).
pub struct Keys {
    /// The config's keys (and the generated one), kept across reloads of the file.
    fixed: Vec<(String, KeyEntry)>,
    /// Digest → key: the fixed keys and the keys file's.
    table: RwLock<Arc<HashMap<String, KeyEntry>>>,
    throttle: Throttle,
    hook: OnceLock<Hook>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("keys", &self.table.read().map(|t| t.len()).unwrap_or(0))
            .finish_non_exhaustive()
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new([])
    }
}

impl Keys {
    /// From `(sha256 hex, tenant)` pairs, with the default throttle.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self::with_throttle(pairs, crate::config::DEFAULT_MAX_AUTH_FAILURES)
    }

    /// From `(sha256 hex, tenant)` pairs; an address or key prefix is throttled after
    /// `max_failures` failed authentications in a minute (0: never).
    pub fn with_throttle(
        pairs: impl IntoIterator<Item = (String, String)>,
        max_failures: u32,
    ) -> Self {
        let fixed: Vec<(String, KeyEntry)> = pairs
            .into_iter()
            .map(|(d, t)| {
                let d = d.to_ascii_lowercase();
                let e = KeyEntry::new(&d, t);
                (d, e)
            })
            .collect();
        let table = fixed.iter().cloned().collect();
        Self {
            fixed,
            table: RwLock::new(Arc::new(table)),
            throttle: Throttle::new(max_failures),
            hook: OnceLock::new(),
        }
    }

    /// Gives the config's keys of these digests the approver role.
    pub fn set_approvers(&mut self, digests: &[String]) {
        for (d, e) in &mut self.fixed {
            e.approver = digests.iter().any(|a| a.eq_ignore_ascii_case(d));
        }
        let table = self.fixed.iter().cloned().collect();
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
    }

    /// Sends every [`AuthEvent`] to `hook` from now on (once).
    pub fn on_event(&self, hook: impl Fn(AuthEvent) + Send + Sync + 'static) {
        let _ = self.hook.set(Arc::new(hook));
    }

    fn emit(&self, e: AuthEvent) {
        if let Some(h) = self.hook.get() {
            h(e);
        }
    }

    /// Replaces the keys of the keys file with `file` (digest → key); the config's keys stay.
    /// A digest in both keeps the config's entry.
    pub fn reload(&self, file: impl IntoIterator<Item = (String, KeyEntry)>) {
        let mut table: HashMap<String, KeyEntry> = file
            .into_iter()
            .map(|(d, e)| (d.to_ascii_lowercase(), e))
            .collect();
        for (d, e) in &self.fixed {
            table.insert(d.clone(), e.clone());
        }
        if let Ok(mut t) = self.table.write() {
            *t = Arc::new(table);
        }
    }

    /// How many keys are known.
    pub fn len(&self) -> usize {
        self.table.read().map(|t| t.len()).unwrap_or(0)
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tenant of the request's `Authorization: Bearer` key.
    pub fn tenant(&self, headers: &HeaderMap, ext: &Extensions) -> Result<String, ApiError> {
        self.identify(headers, ext).map(|(tenant, _)| tenant)
    }

    /// The tenant of the request's key and the key's id: the first 12 hex digits of its
    /// SHA-256, as the config names keys (`key_sha256`), never the key itself. `ext` gives the
    /// client's address ([`ClientAddr`]) to the throttle. An approver key is refused here
    /// (403 `approver_cannot_submit`): it only decides approvals ([`Keys::approver`]).
    pub fn identify(
        &self,
        headers: &HeaderMap,
        ext: &Extensions,
    ) -> Result<(String, String), ApiError> {
        let e = self.lookup(headers, ext)?;
        if e.approver {
            return Err(ApiError::new(
                ErrorCode::ApproverCannotSubmit,
                ampoule_core::Error::ApproverCannotSubmit.to_string(),
            ));
        }
        Ok((e.tenant, e.id))
    }

    /// The tenant and id of an approver's key; any other key is refused (403
    /// `not_an_approver`).
    pub fn approver(
        &self,
        headers: &HeaderMap,
        ext: &Extensions,
    ) -> Result<(String, String), ApiError> {
        let e = self.lookup(headers, ext)?;
        if !e.approver {
            return Err(ApiError::new(
                ErrorCode::NotAnApprover,
                ampoule_core::Error::NotAnApprover.to_string(),
            ));
        }
        Ok((e.tenant, e.id))
    }

    /// The request's key, checked (throttle, expiry, revocation).
    fn lookup(&self, headers: &HeaderMap, ext: &Extensions) -> Result<KeyEntry, ApiError> {
        // A request without a key is a plain 401, throttled or not: it guesses nothing.
        let token = bearer(headers)?;
        let client = ext.get::<ClientAddr>().map(|c| c.0.ip());
        if let Some(ip) = client
            && let Some(refusal) = self.check(Scope::address(ip), client, None, ext)
        {
            return Err(refusal);
        }
        let prefix: String = token.chars().take(PREFIX_CHARS).collect();
        if let Some(refusal) = self.check(Scope::Prefix(prefix.clone()), client, Some(&prefix), ext)
        {
            return Err(refusal);
        }
        let digest = sha256_hex(token);
        let entry = self.table.read().ok().and_then(|t| t.get(&digest).cloned());
        let now = unix_now();
        let refusal = match entry {
            None => ApiError::new(ErrorCode::Unauthorized, "unknown API key"),
            Some(e) if e.revoked_at.is_some_and(|t| t <= now) => ApiError::new(
                ErrorCode::KeyRevoked,
                format!("the API key {} was revoked", e.id),
            ),
            Some(e) if e.expires_at.is_some_and(|t| t <= now) => {
                let why = match &e.replaced_by {
                    Some(new) => format!(
                        "the API key {} was rotated (replaced by {new}) and its grace period has ended",
                        e.id
                    ),
                    None => format!("the API key {} has expired", e.id),
                };
                ApiError::new(ErrorCode::KeyExpired, why)
            }
            Some(e) => return Ok(e),
        };
        self.emit(AuthEvent::Failed(refusal.code));
        let mut scopes = vec![Scope::Prefix(prefix)];
        if let Some(ip) = client {
            scopes.push(Scope::address(ip));
        }
        self.throttle.failed(&scopes);
        Err(refusal)
    }

    /// A 429 when `scope` is throttled now.
    fn check(
        &self,
        scope: Scope,
        client: Option<IpAddr>,
        prefix: Option<&str>,
        ext: &Extensions,
    ) -> Option<ApiError> {
        let (wait, failures, first) = self.throttle.blocked(&scope)?;
        let by = match scope {
            Scope::Prefix(_) => "key_prefix",
            _ => "address",
        };
        self.emit(AuthEvent::Throttled {
            by,
            client,
            prefix_digest: prefix.map(|p| key_id(&sha256_hex(p))),
            failures,
            first,
            request_id: ext.get::<RequestId>().map(|r| r.0.clone()),
        });
        let whom = if by == "address" {
            "from this address"
        } else {
            "with this key prefix"
        };
        Some(
            ApiError::new(
                ErrorCode::AuthThrottled,
                format!(
                    "too many failed authentications {whom} in the last minute; try again in \
                     {wait} s"
                ),
            )
            .retry_after(wait),
        )
    }
}

/// The token of `Authorization: Bearer <token>`, or why there is none.
fn bearer(headers: &HeaderMap) -> Result<&str, ApiError> {
    let unauthorized = |msg: &str| ApiError::new(ErrorCode::Unauthorized, msg);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing `Authorization: Bearer <api key>` header"))?
        .to_str()
        .map_err(|_| unauthorized("the Authorization header is not text"))?
        .trim();
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(unauthorized("expected `Authorization: Bearer <api key>`"));
    }
    let token = token.trim();
    if token.is_empty() || matches!(token, "None" | "null" | "undefined") {
        return Err(unauthorized(
            "the bearer token is empty or a placeholder (the client's token provider \
             returned nothing)",
        ));
    }
    Ok(token)
}

/// Seconds since the epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the throttle counts failures of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Scope {
    /// A client address (IPv6: its /64, which one host usually holds whole).
    Address(IpAddr),
    /// A key prefix.
    Prefix(String),
    /// Everything past [`MAX_TRACKED`].
    Overflow,
}

impl Scope {
    fn address(ip: IpAddr) -> Self {
        Scope::Address(crate::listener::group(ip))
    }
}

/// One scope's window: when it began, failures in it, whether its first refusal was reported.
#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    failures: u32,
    reported: bool,
}

/// Failed authentications per scope, in fixed one-minute windows.
struct Throttle {
    max: u32,
    windows: Mutex<HashMap<Scope, Window>>,
}

impl Throttle {
    fn new(max: u32) -> Self {
        Self {
            max,
            windows: Mutex::new(HashMap::new()),
        }
    }

    /// When `scope` is throttled: seconds to wait, failures counted, and whether this is the
    /// window's first refusal.
    fn blocked(&self, scope: &Scope) -> Option<(u64, u32, bool)> {
        if self.max == 0 {
            return None;
        }
        let mut w = self.windows.lock().ok()?;
        let now = Instant::now();
        let win = w.get_mut(scope)?;
        let elapsed = now.duration_since(win.start);
        if elapsed >= WINDOW {
            w.remove(scope);
            return None;
        }
        if win.failures < self.max {
            return None;
        }
        let first = !win.reported;
        win.reported = true;
        let left = WINDOW - elapsed;
        Some((
            left.as_secs() + u64::from(left.subsec_nanos() > 0),
            win.failures,
            first,
        ))
    }

    /// Counts one failure against each of `scopes`.
    fn failed(&self, scopes: &[Scope]) {
        if self.max == 0 {
            return;
        }
        let Ok(mut w) = self.windows.lock() else {
            return;
        };
        let now = Instant::now();
        for scope in scopes {
            let mut scope = scope.clone();
            if !w.contains_key(&scope) && w.len() >= MAX_TRACKED {
                w.retain(|_, win| now.duration_since(win.start) < WINDOW);
                if w.len() >= MAX_TRACKED {
                    scope = Scope::Overflow;
                }
            }
            let win = w.entry(scope).or_insert(Window {
                start: now,
                failures: 0,
                reported: false,
            });
            if now.duration_since(win.start) >= WINDOW {
                *win = Window {
                    start: now,
                    failures: 0,
                    reported: false,
                };
            }
            win.failures = win.failures.saturating_add(1);
        }
    }
}

/// The request's id (`X-Request-Id`, or generated), put in the request's extensions by the
/// access log so that every door can name it in its [`ampoule_core::Caller`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The header an agent's context comes in when the door's body has no room for it (ACA,
/// MCP, E2B): a JSON object.
pub const CONTEXT_HEADER: &str = "x-ampoule-context";

/// The request's `X-Ampoule-Context`, checked (a JSON object of at most 4 KiB).
pub fn header_context(
    headers: &HeaderMap,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, ApiError> {
    let Some(v) = headers.get(CONTEXT_HEADER) else {
        return Ok(None);
    };
    let text = v
        .to_str()
        .map_err(|_| ApiError::invalid("the X-Ampoule-Context header is not text"))?;
    let c = ampoule_core::caller::CallerContext::parse(text)
        .map_err(|e| ApiError::invalid(format!("X-Ampoule-Context: {e}")))?;
    match c.value() {
        serde_json::Value::Object(m) => Ok(Some(m)),
        _ => Ok(None),
    }
}

/// The core's caller of a request: the key's tenant and id, the request's id when it has
/// one, and the context of its `X-Ampoule-Context` header (a body's context replaces it).
pub fn caller(
    (tenant, key_id): (String, String),
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Result<ampoule_core::Caller, ApiError> {
    let mut c = ampoule_core::Caller::new(tenant);
    c.key_id = Some(key_id);
    c.request_id = extensions.get::<RequestId>().map(|r| r.0.clone());
    c.with_context(header_context(headers)?)
        .map_err(ApiError::from)
}

/// The core's caller of a native API request, from its API key (ACA handlers call
/// [`Keys::identify`] themselves to answer in their dialect).
#[derive(Debug, Clone)]
pub struct Caller(pub ampoule_core::Caller);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = state.keys.identify(&parts.headers, &parts.extensions)?;
        Ok(Caller(caller(key, &parts.extensions, &parts.headers)?))
    }
}

/// The caller's tenant, from its API key (for routes that need no more than the tenant).
#[derive(Debug, Clone)]
pub struct Tenant(pub String);

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        state
            .keys
            .tenant(&parts.headers, &parts.extensions)
            .map(Tenant)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, HeaderValue::from_str(auth).unwrap());
        h
    }

    fn from(ip: &str) -> Extensions {
        let mut e = Extensions::new();
        e.insert(ClientAddr(format!("{ip}:40000").parse().unwrap()));
        e
    }

    #[test]
    fn keys_map_to_tenants_and_placeholders_are_refused() {
        let keys = Keys::new([(sha256_hex("k1"), "a".to_owned())]);
        let none = Extensions::new();
        assert_eq!(keys.tenant(&headers("Bearer k1"), &none).unwrap(), "a");
        assert_eq!(keys.tenant(&headers("bearer  k1 "), &none).unwrap(), "a");
        let (_, id) = keys.identify(&headers("Bearer k1"), &none).unwrap();
        assert_eq!(id, sha256_hex("k1")[..12]);
        for bad in ["Bearer None", "Bearer ", "Basic k1", "Bearer k2", "k1"] {
            let e = keys.tenant(&headers(bad), &none).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized, "{bad}");
        }
        assert!(keys.tenant(&HeaderMap::new(), &none).is_err());
    }

    #[test]
    fn failures_throttle_the_address_and_the_prefix_not_others() {
        let good = "amp_0123456789abcdef";
        let keys = Keys::with_throttle([(sha256_hex(good), "a".to_owned())], 5);
        let events = Arc::new(Mutex::new(Vec::new()));
        let seen = events.clone();
        keys.on_event(move |e| seen.lock().unwrap().push(e));
        let attacker = from("192.0.2.7");
        for i in 0..5 {
            let e = keys
                .identify(&headers(&format!("Bearer guess-{i:08}-xyz")), &attacker)
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized);
        }
        // The sixth try, even with the right key, is throttled from that address...
        let e = keys
            .identify(&headers(&format!("Bearer {good}")), &attacker)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AuthThrottled);
        let wait = e.retry_after_s.unwrap();
        assert!((1..=60).contains(&wait), "{wait}");
        // ...but not from another one, nor from the same /64 of another IPv6 host.
        assert!(
            keys.identify(&headers(&format!("Bearer {good}")), &from("198.51.100.1"))
                .is_ok()
        );
        let v6 = from("[2001:db8::1]");
        for i in 0..5 {
            let _ = keys.identify(&headers(&format!("Bearer v6-{i}-wrong-key")), &v6);
        }
        let e = keys
            .identify(&headers(&format!("Bearer {good}")), &from("[2001:db8::2]"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AuthThrottled);
        // One prefix tried from many addresses is throttled as a prefix.
        for i in 0..5 {
            let _ = keys.identify(
                &headers(&format!("Bearer amp_deadbeef{i:040}")),
                &from(&format!("203.0.113.{i}")),
            );
        }
        let e = keys
            .identify(&headers("Bearer amp_deadbeefffff"), &from("203.0.113.99"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::AuthThrottled);
        assert!(e.message.contains("key prefix"), "{}", e.message);
        let events = events.lock().unwrap();
        let firsts: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                AuthEvent::Throttled {
                    by, first: true, ..
                } => Some(*by),
                _ => None,
            })
            .collect();
        assert_eq!(firsts, ["address", "address", "key_prefix"]);
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, AuthEvent::Failed(ErrorCode::Unauthorized)))
                .count(),
            15
        );
    }

    #[test]
    fn expired_revoked_and_rotated_keys_say_so() {
        let keys = Keys::new([]);
        let now = unix_now();
        let mut gone = KeyEntry::new(&sha256_hex("old"), "a");
        gone.expires_at = Some(now - 1);
        let mut revoked = KeyEntry::new(&sha256_hex("bad"), "a");
        revoked.revoked_at = Some(now);
        let mut rotated = KeyEntry::new(&sha256_hex("prev"), "a");
        rotated.expires_at = Some(now + 3600);
        rotated.replaced_by = Some("abc".into());
        keys.reload([
            (sha256_hex("old"), gone),
            (sha256_hex("bad"), revoked),
            (sha256_hex("prev"), rotated),
        ]);
        let none = Extensions::new();
        let code = |k: &str| {
            keys.identify(&headers(&format!("Bearer {k}")), &none)
                .map_err(|e| e.code)
        };
        assert_eq!(code("old").unwrap_err(), ErrorCode::KeyExpired);
        assert_eq!(code("bad").unwrap_err(), ErrorCode::KeyRevoked);
        assert_eq!(code("prev").unwrap().0, "a");
        // A reload drops what the file no longer holds.
        keys.reload([]);
        assert_eq!(code("prev").unwrap_err(), ErrorCode::Unauthorized);
    }
}
