//! Bearer API keys and the tenants they belong to.
//!
//! Invariants: keys exist here only as SHA-256 digests; a request's key is hashed and looked
//! up, never compared in clear. Placeholder tokens that buggy clients send (`Bearer None`,
//! empty) are refused like any unknown key, with a message that says what happened.

use std::collections::HashMap;

use axum::extract::FromRequestParts;
use axum::http::{HeaderMap, header, request::Parts};

use crate::AppState;
use crate::config::sha256_hex;
use crate::error::{ApiError, ErrorCode};

/// Key digests → tenants.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    by_digest: HashMap<String, String>,
}

impl Keys {
    /// From `(sha256 hex, tenant)` pairs.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            by_digest: pairs
                .into_iter()
                .map(|(d, t)| (d.to_ascii_lowercase(), t))
                .collect(),
        }
    }

    /// The tenant of the request's `Authorization: Bearer` key.
    pub fn tenant(&self, headers: &HeaderMap) -> Result<String, ApiError> {
        self.identify(headers).map(|(tenant, _)| tenant)
    }

    /// The tenant of the request's key and the key's id: the first 12 hex digits of its
    /// SHA-256, as the config names keys (`key_sha256`), never the key itself.
    pub fn identify(&self, headers: &HeaderMap) -> Result<(String, String), ApiError> {
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
        let digest = sha256_hex(token);
        let tenant = self
            .by_digest
            .get(&digest)
            .cloned()
            .ok_or_else(|| unauthorized("unknown API key"))?;
        let key_id = digest.get(..12).unwrap_or(&digest).to_owned();
        Ok((tenant, key_id))
    }
}

/// The request's id (`X-Request-Id`, or generated), put in the request's extensions by the
/// access log so that every door can name it in its [`ampoule_core::Caller`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

/// The core's caller of a request: the key's tenant and id, and the request's id when it has
/// one.
pub fn caller(
    (tenant, key_id): (String, String),
    extensions: &axum::http::Extensions,
) -> ampoule_core::Caller {
    let mut c = ampoule_core::Caller::new(tenant);
    c.key_id = Some(key_id);
    c.request_id = extensions.get::<RequestId>().map(|r| r.0.clone());
    c
}

/// The core's caller of a native API request, from its API key (ACA handlers call
/// [`Keys::tenant`] themselves to answer in their dialect).
#[derive(Debug, Clone)]
pub struct Caller(pub ampoule_core::Caller);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let key = state.keys.identify(&parts.headers)?;
        Ok(Caller(caller(key, &parts.extensions)))
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
        state.keys.tenant(&parts.headers).map(Tenant)
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

    #[test]
    fn keys_map_to_tenants_and_placeholders_are_refused() {
        let keys = Keys::new([(sha256_hex("k1"), "a".to_owned())]);
        assert_eq!(keys.tenant(&headers("Bearer k1")).unwrap(), "a");
        assert_eq!(keys.tenant(&headers("bearer  k1 ")).unwrap(), "a");
        let (_, id) = keys.identify(&headers("Bearer k1")).unwrap();
        assert_eq!(id, sha256_hex("k1")[..12]);
        for bad in ["Bearer None", "Bearer ", "Basic k1", "Bearer k2", "k1"] {
            let e = keys.tenant(&headers(bad)).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized, "{bad}");
        }
        assert!(keys.tenant(&HeaderMap::new()).is_err());
    }
}
