//! SQLite-only tests: migrations from the schema versions SQLite registries were made
//! with. Everything else is in the suite both backends run (`crate::tests`).

use super::schema::SCHEMA_V1;
use super::*;

#[tokio::test]
async fn a_version_1_registry_is_migrated_forward_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db");
    // A version-1 registry as a server of that version left it.
    {
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .unwrap();
        sqlx::raw_sql(SCHEMA_V1).execute(&pool).await.unwrap();
        sqlx::raw_sql(
            "INSERT INTO meta(key, value) VALUES ('crl_number', '0'); \
             INSERT INTO operators(name, role, fleets, created_at) VALUES ('admin', 'admin', '[]', 0); \
             PRAGMA user_version = 1;",
        )
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;
    }
    let r = SqliteRegistry::open(&path, "10.240.0.0/16".parse::<ipnet::Ipv4Net>().unwrap())
        .await
        .unwrap();
    assert_eq!(
        r.operator("admin").await.unwrap().unwrap().role,
        Role::Admin
    );
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&r.reader)
        .await
        .unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    // A registry from a newer server is refused, not misread.
    sqlx::raw_sql("PRAGMA user_version = 99")
        .execute(&r.writer)
        .await
        .unwrap();
    r.close().await;
    let err = SqliteRegistry::open(&path, "10.240.0.0/16".parse::<ipnet::Ipv4Net>().unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("newer than this server"), "{err}");
}
