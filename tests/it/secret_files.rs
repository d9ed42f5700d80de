//! Files a secret names (issue 19): `/dev/zero`, `/dev/urandom`, a FIFO, a
//! directory or a huge file as `sslrootcert` (or `sslcert`/`sslkey`, or a
//! `/config` URI's `?sslrootcert=`) is answered 502 `secret_malformed` within
//! the login's deadline, with the sidecar alive and its memory flat; a path
//! outside `secret_file_dirs` is refused without looking at it.

use std::path::{Path, PathBuf};

use crate::support::*;

async fn secret_naming(db: &Db, extra: serde_json::Value) -> String {
    let conn_id = unique("files");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &serde_json::json!({
            "conn_type": "postgres", "host": "localhost", "port": env().pg_port,
            "login": db.role, "password": db.password, "schema": db.role, "extra": extra,
        })
        .to_string(),
    )
    .await;
    conn_id
}

/// A directory of hostile files: a FIFO, a directory, a 50 MiB file, links.
fn hostile_dir() -> PathBuf {
    let dir = env().dir.join(unique("hostile"));
    std::fs::create_dir_all(dir.join("a-directory")).unwrap();
    let fifo = dir.join("fifo");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let big = std::fs::File::create(dir.join("big.pem")).unwrap();
    big.set_len(50 * 1024 * 1024).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero-link.pem")).unwrap();
    std::fs::copy(&env().ca_file, dir.join("ca.pem")).unwrap();
    dir
}

fn under(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[tokio::test]
async fn hostile_files_are_refused_within_the_deadline_and_cost_nothing() {
    let db = airflow_json_db().await;
    let dir = hostile_dir();
    let sc = Sidecar::start(Options {
        env: vec![
            // /dev too, so that the device itself (not its directory) is refused.
            (
                "SIDECAR_SECRET_FILE_DIRS",
                format!("{},/dev", dir.display()),
            ),
            ("SIDECAR_CONNECT_TIMEOUT", "3s".into()),
        ],
        ..Default::default()
    })
    .await;
    sc.forbid(&db.password);
    let rss_before = sc.rss_kib();
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (
            serde_json::json!({"sslrootcert": "/dev/zero"}),
            "not a regular file",
        ),
        (
            serde_json::json!({"sslrootcert": "/dev/urandom"}),
            "not a regular file",
        ),
        (
            serde_json::json!({"sslrootcert": under(&dir, "fifo")}),
            "not a regular file",
        ),
        (
            serde_json::json!({"sslrootcert": under(&dir, "a-directory")}),
            "not a regular file",
        ),
        (
            serde_json::json!({"sslrootcert": under(&dir, "big.pem")}),
            "larger than",
        ),
        // A link to a device: what it leads to is what counts.
        (
            serde_json::json!({"sslrootcert": under(&dir, "zero-link.pem")}),
            "not a regular file",
        ),
        (
            serde_json::json!({"sslcert": "/dev/zero", "sslkey": under(&dir, "fifo")}),
            "not a regular file",
        ),
        (
            serde_json::json!({"sslcert": under(&dir, "ca.pem"), "sslkey": "/dev/urandom"}),
            "not a regular file",
        ),
    ];
    for (extra, why) in cases {
        let conn_id = secret_naming(&db, extra.clone()).await;
        let r = sc.get(&format!("/connections/{conn_id}")).await;
        let msg = r.expect_error(502, "secret_malformed");
        assert!(
            msg.contains(why) && msg.contains(&conn_id),
            "{extra}: {msg}"
        );
        assert!(
            !msg.contains(&dir.display().to_string()) && !msg.contains("/dev/"),
            "{msg}"
        );
        let live = reqwest::get(format!("{}/livez", sc.admin_url))
            .await
            .unwrap();
        assert_eq!(live.status(), 200);
    }
    let grown = sc.rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "the sidecar grew by {grown} KiB");
    // The CA in the same directory is fine: the rules refuse only what they should.
    let conn_id = secret_naming(
        &db,
        serde_json::json!({"sslrootcert": under(&dir, "ca.pem")}),
    )
    .await;
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["extra"]["sslrootcert"], under(&dir, "ca.pem"));
}

/// At the defaults a secret may name files only where the operator's CA
/// is, and a path elsewhere gets one answer whether it exists or not.
#[tokio::test]
async fn outside_the_directories_nothing_is_looked_at_or_told() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    let mut messages = vec![];
    // A link placed in the CA's directory that leads out of it counts as outside.
    let link = env().ca_file.with_file_name(unique("link"));
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let link = link.display().to_string();
    for path in [
        link.as_str(),
        "/dev/zero",
        "/etc/passwd",
        "/nonexistent/ca.pem",
        "/etc/../etc/passwd",
    ] {
        let conn_id = secret_naming(&db, serde_json::json!({"sslrootcert": path})).await;
        let r = sc.get(&format!("/connections/{conn_id}")).await;
        let msg = r.expect_error(502, "secret_malformed");
        assert!(msg.contains("outside secret_file_dirs"), "{path}: {msg}");
        // The same words after the ids and the version.
        messages.push(msg.rsplit("): ").next().unwrap().to_string());
    }
    messages.dedup();
    assert_eq!(messages.len(), 1, "the answers differ: {messages:?}");
    // The operator's CA directory is allowed (the default).
    let ca = env().ca_file.display().to_string();
    let conn_id = secret_naming(&db, serde_json::json!({"sslrootcert": ca})).await;
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// A `/config` URI's `?sslrootcert=` is a file a secret names too.
#[tokio::test]
async fn a_config_uri_naming_dev_zero_is_refused() {
    let db = airflow_json_db().await;
    let key = unique("sql_alchemy_conn");
    put_secret(
        &format!("airflow/config/{key}"),
        &format!(
            "postgresql+psycopg2://{}:{}@localhost:{}/{}?sslmode=verify-full&sslrootcert=/dev/zero",
            db.role,
            db.password,
            env().pg_port,
            db.role
        ),
    )
    .await;
    let sc = Sidecar::start(Options {
        env: vec![
            ("SIDECAR_CONFIG_KEYS", key.clone()),
            ("SIDECAR_SECRET_FILE_DIRS", "/dev".into()),
        ],
        ..Default::default()
    })
    .await;
    sc.forbid(&db.password);
    let r = sc.get(&format!("/config/{key}")).await;
    let msg = r.expect_error(502, "secret_malformed");
    assert!(msg.contains("not a regular file"), "{msg}");
    assert!(!msg.contains(&db.password));
}
