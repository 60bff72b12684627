//! The web console at `/console`: static pages (hand-written ES modules and CSS, and one
//! vendored, committed CodeMirror bundle, `console/vendor/`) embedded in the binary, which call
//! the `/v1` API from the browser with the key the user typed (kept in `sessionStorage`, sent
//! as `Authorization: Bearer`). Nothing is built at build or run time.
//!
//! The pages themselves are public (they hold nothing); every figure they show comes from an
//! API call made with the key, so without a valid key they show nothing but the sign-in form.
//!
//! Invariants:
//! - only the files listed in [`ASSETS`] are served, each on its own route: any other path
//!   under `/console/` still reaches the ACA fallback exactly as before the console existed;
//! - every answer carries [`CSP`] (no inline script or style, no other origin, no framing) and
//!   `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`;
//! - output of sandboxed code is never markup in this origin: the console's own scripts put it
//!   in the page with `textContent`, and images only as validated PNG/JPEG `data:` URLs
//!   (`render.js`); the tests below check that none of them writes markup.

use std::sync::OnceLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};

use crate::AppState;

/// The console's Content-Security-Policy: scripts, styles and connections from this origin
/// only, images also from `data:` URLs (charts made by sandboxed code arrive as base64 PNG),
/// no plugins, no workers, no framing, no `<base>`, no form posts.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; font-src 'self'; manifest-src 'self'; \
    object-src 'none'; frame-src 'none'; worker-src 'none'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'none'";

/// One embedded file: its path below `/console/`, media type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $type:expr) => {
        Asset {
            path: $path,
            content_type: $type,
            bytes: include_bytes!(concat!("../console/", $path)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";

/// Every file of the console (`crates/server/console/`). Adding a file is one line here.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("js/main.js", JS),
    asset!("js/api.js", JS),
    asset!("js/dom.js", JS),
    asset!("js/render.js", JS),
    asset!("js/editor.js", JS),
    asset!("js/playground.js", JS),
    asset!("js/sessions.js", JS),
    asset!("js/audit.js", JS),
    asset!("js/usage.js", JS),
    asset!("js/charts.js", JS),
    asset!("vendor/codemirror.js", JS),
    asset!("vendor/LICENSE-codemirror", "text/plain; charset=utf-8"),
];

/// The strong validator of each asset (SHA-256 of its bytes), computed once.
fn etags() -> &'static [String] {
    static ETAGS: OnceLock<Vec<String>> = OnceLock::new();
    ETAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha256::digest(a.bytes);
                let hex: String = d.iter().take(16).map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

/// The headers every console answer carries.
fn security_headers(h: &mut HeaderMap) {
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "permissions-policy",
        HeaderValue::from_static("camera=(), microphone=(), geolocation=(), payment=(), usb=()"),
    );
}

/// Answers asset `i`: its bytes, or 304 when the client's copy is current. Assets keep their
/// names across releases, so browsers revalidate every time (`no-cache`), which the ETag makes
/// cheap.
fn serve(i: usize, req_headers: &HeaderMap) -> Response {
    let (Some(asset), Some(etag)) = (ASSETS.get(i), etags().get(i)) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let fresh = req_headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        let mut r = asset.bytes.into_response();
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
        r
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    security_headers(h);
    resp
}

/// The console's routes: `/console` and `/console/` (the page) and `/console/<asset>`.
pub fn routes() -> axum::Router<AppState> {
    let mut router = axum::Router::new();
    for (i, asset) in ASSETS.iter().enumerate() {
        let handler = get(move |headers: HeaderMap| async move { serve(i, &headers) });
        if asset.path == "index.html" {
            router = router
                .route("/console", handler.clone())
                .route("/console/", handler.clone());
        }
        router = router.route(&format!("/console/{}", asset.path), handler);
    }
    router
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn every_asset_is_routable_and_typed() {
        for a in ASSETS {
            assert!(!a.bytes.is_empty(), "{} is empty", a.path);
            assert!(
                a.path
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "./-_".contains(c)),
                "{}",
                a.path
            );
        }
        assert_eq!(etags().len(), ASSETS.len());
    }

    #[test]
    fn no_inline_script_or_style_in_the_page() {
        let html = std::str::from_utf8(ASSETS[0].bytes).unwrap();
        assert_eq!(ASSETS[0].path, "index.html");
        // Every <script> has a src (the CSP would block an inline one anyway; this keeps the
        // page from relying on one), and no element carries a style or on* attribute.
        for (i, _) in html.match_indices("<script") {
            let tag = &html[i..i + html[i..].find('>').unwrap()];
            assert!(tag.contains(" src=\"/console/"), "inline script: {tag}");
        }
        assert!(!html.contains("<style"), "inline <style>");
        assert!(!html.contains(" style="), "style attribute");
        let on_attr = html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_lowercase())
                .collect();
            !name.is_empty() && rest[name.len()..].starts_with('=')
        });
        assert!(!on_attr, "event handler attribute");
    }

    #[test]
    fn scripts_never_write_markup() {
        // Sandboxed output must never become live HTML in this origin: no script of the
        // console assigns innerHTML/outerHTML or uses insertAdjacentHTML or document.write.
        // The vendored editor is exempt: it renders the user's own typing, not sandbox output.
        for a in ASSETS
            .iter()
            .filter(|a| a.path.starts_with("js/") && a.path.ends_with(".js"))
        {
            let text = std::str::from_utf8(a.bytes).unwrap();
            for bad in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "createContextualFragment",
                "srcdoc",
                "setAttribute(\"style",
                ".style.",
            ] {
                assert!(!text.contains(bad), "{} uses {bad}", a.path);
            }
        }
    }

    #[test]
    fn every_referenced_file_is_embedded() {
        // A module imported or a file linked from the page but missing from ASSETS would be
        // answered by the ACA fallback, and the console would break only in a browser.
        let known: Vec<&str> = ASSETS.iter().map(|a| a.path).collect();
        let index = std::str::from_utf8(ASSETS[0].bytes).unwrap();
        for (i, _) in index.match_indices("\"/console/") {
            let rest = &index[i + 10..];
            let path = &rest[..rest.find('"').unwrap()];
            assert!(known.contains(&path), "index.html links /console/{path}");
        }
        for a in ASSETS.iter().filter(|a| a.path.starts_with("js/")) {
            let text = std::str::from_utf8(a.bytes).unwrap();
            for (i, _) in text.match_indices(" from \"") {
                let rest = &text[i + 7..];
                let spec = &rest[..rest.find('"').unwrap()];
                let resolved = if let Some(p) = spec.strip_prefix("./") {
                    format!("js/{p}")
                } else if let Some(p) = spec.strip_prefix("../") {
                    p.to_owned()
                } else {
                    panic!("{} imports {spec}: only relative imports", a.path)
                };
                assert!(
                    known.contains(&resolved.as_str()),
                    "{} imports {spec}",
                    a.path
                );
            }
        }
    }

    #[test]
    fn the_policy_allows_no_inline_script_and_no_other_origin() {
        let directives: Vec<&str> = CSP.split(';').map(str::trim).collect();
        for d in &directives {
            assert!(!d.contains("unsafe-inline"), "{d}");
            assert!(!d.contains("unsafe-eval"), "{d}");
            assert!(
                !d.contains("http:") && !d.contains("https:") && !d.contains('*'),
                "{d}"
            );
        }
        assert!(directives.contains(&"script-src 'self'"));
        assert!(directives.contains(&"default-src 'none'"));
        assert!(directives.contains(&"frame-ancestors 'none'"));
    }

    async fn get(app: &axum::Router, uri: &str, etag: Option<&str>) -> Response {
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder().uri(uri);
        if let Some(t) = etag {
            req = req.header(header::IF_NONE_MATCH, t);
        }
        let req = req.body(axum::body::Body::empty()).unwrap();
        app.clone().oneshot(req).await.unwrap()
    }

    #[tokio::test]
    async fn the_console_is_served_with_its_policy_and_other_paths_are_untouched() {
        let root = tempfile::tempdir().unwrap();
        let text = format!(
            "[server]\ndata_dir = \"{}\"\n[[auth.keys]]\ntenant = \"a\"\n\
             key_sha256 = \"{}\"\n[pools.python]\nwarm = 0\n",
            root.path().join("data").display(),
            crate::config::sha256_hex("k"),
        );
        let cfg = crate::Config::parse(&text).unwrap();
        let engine = crate::fake::FakeEngine::new(root.path());
        let keys = crate::serve::keys(&cfg).unwrap();
        let state = crate::serve::state(&cfg, std::sync::Arc::new(engine), keys).unwrap();
        let app = crate::app(state);

        for uri in ["/console", "/console/"] {
            let resp = get(&app, uri, None).await;
            assert_eq!(resp.status(), StatusCode::OK, "{uri}");
            let h = resp.headers();
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
            assert!(h.get(header::SET_COOKIE).is_none());
        }
        // No key needed for the (empty) page; the key is for the API it calls.
        let resp = get(&app, "/console/js/main.js", None).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], JS);
        let etag = resp.headers()[header::ETAG].to_str().unwrap().to_owned();
        let resp = get(&app, "/console/js/main.js", Some(&etag)).await;
        assert_eq!(resp.status(), StatusCode::NOT_MODIFIED);
        assert_eq!(resp.headers()[header::CONTENT_SECURITY_POLICY], CSP);
        // Anything else below /console/ is the ACA API's, as before the console existed: its
        // 404, without the console's headers.
        let resp = get(&app, "/console/not-a-file.js", None).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(
            resp.headers()
                .get(header::CONTENT_SECURITY_POLICY)
                .is_none()
        );
    }
}
