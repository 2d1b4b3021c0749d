//! Copying a single node's SQLite registry into an empty PostgreSQL registry, for going
//! from one node to a cluster without re-enrolling a device. The SQLite file is only read;
//! the copy is one PostgreSQL transaction, so it lands whole or not at all, and a
//! PostgreSQL registry that already holds anything is refused (nothing is overwritten).

use std::path::Path;

use sqlx::postgres::PgPool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteRow};
use sqlx::{Postgres, Row as _, Transaction};

use crate::StoreError;

#[derive(Clone, Copy)]
enum Kind {
    Int,
    Text,
    Blob,
}

use Kind::{Blob, Int, Text};

/// The tables copied, in an order that keeps references whole, with their columns.
const TABLES: &[(&str, &[(&str, Kind)])] = &[
    (
        "provisioning_keys",
        &[
            ("id", Text),
            ("hash", Blob),
            ("fleet", Text),
            ("uses_left", Int),
            ("expires_at", Int),
            ("created_at", Int),
            ("revoked_at", Int),
        ],
    ),
    (
        "certificates",
        &[
            ("serial", Text),
            ("kind", Text),
            ("subject", Text),
            ("issued_at", Int),
            ("expires_at", Int),
            ("revoked_at", Int),
        ],
    ),
    (
        "devices",
        &[
            ("uuid", Text),
            ("fleet", Text),
            ("wg_public_key", Text),
            ("overlay_ip", Int),
            ("cert_serial", Text),
            ("cert_public_key", Blob),
            ("cert_expires_at", Int),
            ("created_at", Int),
            ("updated_at", Int),
            ("revoked_at", Int),
            ("key_id", Text),
            ("device_type", Text),
            ("hostname", Text),
            ("last_endpoint", Text),
            ("last_seen", Int),
        ],
    ),
    (
        "operators",
        &[
            ("name", Text),
            ("role", Text),
            ("fleets", Text),
            ("created_at", Int),
            ("revoked_at", Int),
            ("token_hash", Blob),
            ("token_expires_at", Int),
            ("token_used_at", Int),
            ("api_token_hash", Blob),
            ("api_token_expires_at", Int),
        ],
    ),
    (
        "fleets",
        &[("name", Text), ("ssh_logins", Text), ("updated_at", Int)],
    ),
    (
        "device_ssh",
        &[("uuid", Text), ("host_keys", Text), ("updated_at", Int)],
    ),
    (
        "audit",
        &[
            ("id", Int),
            ("at", Int),
            ("actor", Text),
            ("action", Text),
            ("device", Text),
            ("detail", Text),
        ],
    ),
];

/// What a copy moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Rows per table, in [`TABLES`] order.
    pub rows: Vec<(&'static str, u64)>,
}

/// Copies the SQLite registry at `sqlite` into the PostgreSQL registry at `url` (migrated
/// first), which must be empty.
pub async fn copy_from_sqlite(sqlite: &Path, url: &str) -> Result<ImportReport, StoreError> {
    let opts = SqliteConnectOptions::new()
        .filename(sqlite)
        .create_if_missing(false)
        .read_only(true);
    let mut source = sqlx::ConnectOptions::connect(&opts).await?;
    let version: i64 = sqlx::query_scalar("PRAGMA user_version")
        .fetch_one(&mut source)
        .await?;
    if version != crate::sqlite::SCHEMA_VERSION {
        return Err(StoreError::Inconsistent(format!(
            "the SQLite registry has schema version {version}; start the single node once with this \
             version of floto-vpn-server (it migrates to {}) and stop it before copying",
            crate::sqlite::SCHEMA_VERSION
        )));
    }
    let pool = PgPool::connect(url).await?;
    super::schema::migrate(&pool).await?;
    let mut tx = super::writer::begin_locked(&pool).await?;
    let held: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM devices) + (SELECT COUNT(*) FROM provisioning_keys) \
         + (SELECT COUNT(*) FROM operators) + (SELECT COUNT(*) FROM certificates)",
    )
    .fetch_one(&mut *tx)
    .await?;
    if held > 0 {
        return Err(StoreError::Inconsistent(
            "the PostgreSQL registry is not empty; copy only into a new database".into(),
        ));
    }
    // Device rows are copied as they are: their certificates and key uses are already in
    // the tables copied before them.
    sqlx::query("ALTER TABLE devices DISABLE TRIGGER device_certificate")
        .execute(&mut *tx)
        .await?;
    let mut rows = Vec::new();
    for (table, columns) in TABLES {
        let names: Vec<&str> = columns.iter().map(|(c, _)| *c).collect();
        let select = format!("SELECT {} FROM {table}", names.join(", "));
        let source_rows: Vec<SqliteRow> = sqlx::query(&select).fetch_all(&mut source).await?;
        let placeholders: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {table} ({}) VALUES ({})",
            names.join(", "),
            placeholders.join(", ")
        );
        for row in &source_rows {
            insert_row(&mut tx, &insert, columns, row).await?;
        }
        rows.push((*table, source_rows.len() as u64));
    }
    sqlx::query("ALTER TABLE devices ENABLE TRIGGER device_certificate")
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "SELECT setval(pg_get_serial_sequence('audit', 'id'), GREATEST((SELECT MAX(id) FROM audit), 1))",
    )
    .execute(&mut *tx)
    .await?;
    let crl: Option<String> = sqlx::query_scalar("SELECT value FROM meta WHERE key = 'crl_number'")
        .fetch_optional(&mut source)
        .await?;
    if let Some(crl) = crl {
        sqlx::query("UPDATE meta SET value = $1 WHERE key = 'crl_number'")
            .bind(crl)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    pool.close().await;
    Ok(ImportReport { rows })
}

async fn insert_row(
    tx: &mut Transaction<'static, Postgres>,
    insert: &str,
    columns: &[(&str, Kind)],
    row: &SqliteRow,
) -> Result<(), StoreError> {
    let mut q = sqlx::query(insert);
    for (name, kind) in columns {
        q = match kind {
            Int => q.bind(row.try_get::<Option<i64>, _>(*name)?),
            Text => q.bind(row.try_get::<Option<String>, _>(*name)?),
            Blob => q.bind(row.try_get::<Option<Vec<u8>>, _>(*name)?),
        };
    }
    q.execute(&mut **tx).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use time::OffsetDateTime;

    use floto_pgtest::Postgres;
    use floto_proto::admin::{Role, TokenKind};
    use floto_proto::{DeviceId, WgKey};

    use super::*;
    use crate::postgres::PgRegistry;
    use crate::sqlite::SqliteRegistry;
    use crate::*;

    fn commit(key: u8, wg: u8, now: OffsetDateTime) -> EnrollCommit {
        EnrollCommit {
            key_hash: [key; 32],
            device: DeviceId::new_random(),
            wg_public_key: WgKey([wg; 32]),
            cert_serial: format!("{:032x}", rand::random::<u128>()),
            cert_public_key: vec![wg],
            cert_expires_at: now + Duration::from_secs(3600),
            device_type: Some("pi".into()),
            hostname: None,
            now,
            reuse_addresses_revoked_before: now - Duration::from_secs(86_400),
        }
    }

    #[tokio::test]
    async fn a_single_nodes_registry_moves_to_postgres_whole_and_only_once() {
        let now = OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let overlay: ipnet::Ipv4Net = "10.240.0.0/16".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.db");
        let sqlite = SqliteRegistry::open(&path, overlay).await.unwrap();
        sqlite
            .create_key(NewKey {
                id: "k1".into(),
                hash: [1; 32],
                fleet: "lab".into(),
                uses: Some(5),
                expires_at: None,
                created_at: now,
            })
            .await
            .unwrap();
        let mut ids = Vec::new();
        for wg in 1..=3 {
            let d = sqlite.enroll(commit(1, wg, now)).await.unwrap().unwrap();
            ids.push(d.device().id);
        }
        sqlite.revoke_device(&ids[2], now).await.unwrap();
        sqlite
            .add_operator(NewOperator {
                name: "alice".into(),
                role: Role::Operator,
                fleets: vec!["lab".into()],
                token_kind: TokenKind::Login,
                token_hash: [9; 32],
                token_expires_at: None,
                now,
            })
            .await
            .unwrap();
        for action in ["a", "b"] {
            sqlite
                .append_audit(AuditRecord {
                    at: now,
                    actor: "alice".into(),
                    action: action.into(),
                    device: Some(ids[0]),
                    detail: "{}".into(),
                })
                .await
                .unwrap();
        }
        sqlite
            .set_fleet_ssh_logins("lab", Some(&["pi".to_owned()]), now)
            .await
            .unwrap();
        let before = (
            sqlite.devices().await.unwrap(),
            sqlite.list_keys().await.unwrap(),
            sqlite.operators().await.unwrap(),
            sqlite.revoked_certificates(now).await.unwrap(),
            sqlite.audit(None, None, None, 100).await.unwrap(),
            sqlite.fleet_settings().await.unwrap(),
        );
        sqlite.close().await;

        let pg = Postgres::start();
        let url = pg.create_database("floto");
        let report = copy_from_sqlite(&path, &url).await.unwrap();
        assert!(report.rows.contains(&("devices", 3)), "{report:?}");
        let r = PgRegistry::connect(&url, overlay).await.unwrap();
        let after = (
            r.devices().await.unwrap(),
            r.list_keys().await.unwrap(),
            r.operators().await.unwrap(),
            r.revoked_certificates(now).await.unwrap(),
            r.audit(None, None, None, 100).await.unwrap(),
            r.fleet_settings().await.unwrap(),
        );
        assert_eq!(before, after, "the registry changed on the way");
        // The copy goes on as the original would: the key's uses, the next address, the
        // token, the audit log's order.
        let next = r.enroll(commit(1, 4, now)).await.unwrap().unwrap();
        assert_eq!(next.device().overlay_ip, Ipv4Addr::new(10, 240, 0, 5));
        assert_eq!(r.list_keys().await.unwrap()[0].uses_left, Some(1));
        assert_eq!(
            r.consume_login_token(&[9; 32], now)
                .await
                .unwrap()
                .unwrap()
                .name,
            "alice"
        );
        r.append_audit(AuditRecord {
            at: now,
            actor: "alice".into(),
            action: "c".into(),
            device: None,
            detail: "{}".into(),
        })
        .await
        .unwrap();
        assert_eq!(r.audit(None, None, None, 1).await.unwrap()[0].action, "c");
        // A second copy is refused, and changes nothing.
        let err = copy_from_sqlite(&path, &url).await.unwrap_err();
        assert!(err.to_string().contains("not empty"), "{err}");
        assert_eq!(r.devices().await.unwrap().len(), 4);
    }
}
