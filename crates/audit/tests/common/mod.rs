//! The two backends the suites run on.
#![allow(dead_code, unreachable_pub)]

use std::str::FromStr;
use std::sync::Arc;

use ampoule_audit::SqlStore;
use sqlx::Connection;

/// A fresh SQLite store in a temporary directory (kept alive by the returned guard).
pub async fn sqlite() -> (Arc<SqlStore>, Box<dyn std::any::Any>) {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let store = SqlStore::sqlite(&dir.path().join("audit.db"))
        .await
        .unwrap_or_else(|e| panic!("open sqlite: {e:?}"));
    (Arc::new(store), Box::new(dir))
}

/// A fresh PostgreSQL store in a database of its own, on the server named by
/// `AMPOULE_TEST_POSTGRES_URL`. Without that variable the test is skipped (None), except
/// under CI (`CI` set), where the server must be there and its absence fails the test.
pub async fn postgres() -> Option<(Arc<SqlStore>, Box<dyn std::any::Any>)> {
    let Ok(url) = std::env::var("AMPOULE_TEST_POSTGRES_URL") else {
        if std::env::var_os("CI").is_some() {
            panic!("AMPOULE_TEST_POSTGRES_URL is not set under CI (scripts/test.sh sets it)");
        }
        eprintln!("skipped: AMPOULE_TEST_POSTGRES_URL is not set");
        return None;
    };
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "ampoule_test_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    );
    let mut conn = sqlx::PgConnection::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create database: {e}"));
    let opts = sqlx::postgres::PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("url: {e}"))
        .database(&name);
    let store = SqlStore::postgres(opts)
        .await
        .unwrap_or_else(|e| panic!("open postgres: {e:?}"));
    Some((Arc::new(store), Box::new(())))
}

/// Defines each named `async fn(Arc<SqlStore>)` as a test on SQLite and on PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let (store, _guard) = $crate::common::sqlite().await;
                    super::$name(store).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    let Some((store, _guard)) = $crate::common::postgres().await else {
                        return;
                    };
                    super::$name(store).await;
                }
            )*
        }
    };
}
