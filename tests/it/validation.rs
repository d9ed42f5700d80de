//! The login check: rejected and unreachable databases, TLS modes,
//! SIDECAR_RESOLVE, and the rotation window.

use crate::support::*;
use serde_json::json;

fn airflow_secret(host: &str, port: u16, role: &str, pw: &str, extra: serde_json::Value) -> String {
    json!({"conn_type": "postgres", "host": host, "port": port, "login": role,
           "password": pw, "schema": role, "extra": extra})
    .to_string()
}

#[tokio::test]
async fn wrong_password_is_503_credentials_rejected() {
    let role = unique("wrongpw");
    let real = password();
    create_role(&role, &real).await;
    let wrong = password();
    let conn_id = unique("wrongpw");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &airflow_secret("localhost", env().pg_port, &role, &wrong, json!({})),
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&wrong);
    sc.forbid(&real);
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    let msg = r.expect_error(503, "credentials_rejected");
    assert!(msg.contains(&conn_id), "{msg}");
    assert!(
        msg.contains(&format!("localhost:{}", env().pg_port)),
        "{msg}"
    );
    assert!(msg.contains("password authentication failed"), "{msg}");
    assert!(msg.contains("28P01"), "{msg}");
    assert!(!r.text.contains(&wrong));
}

#[tokio::test]
async fn missing_database_is_rejected_too() {
    let role = unique("nodb");
    let pw = password();
    create_role(&role, &pw).await;
    let conn_id = unique("nodb");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &json!({"login": role, "password": pw, "host": "localhost", "port": env().pg_port,
                "schema": "no_such_database"})
        .to_string(),
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    let msg = sc
        .get(&format!("/connections/{conn_id}"))
        .await
        .expect_error(503, "credentials_rejected")
        .to_string();
    assert!(msg.contains("3D000"), "{msg}");
}

#[tokio::test]
async fn closed_port_is_503_database_unreachable() {
    let role = unique("closed");
    let pw = password();
    let conn_id = unique("closed");
    let port = closed_port();
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &airflow_secret("localhost", port, &role, &pw, json!({})),
    )
    .await;
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_CONNECT_TIMEOUT", "2s".into())],
        ..Default::default()
    })
    .await;
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    let msg = r.expect_error(503, "database_unreachable");
    assert!(msg.contains(&format!("localhost:{port}")), "{msg}");
    assert!(msg.to_lowercase().contains("refused"), "{msg}");
}

/// A host that never answers: unreachable once the connect timeout passes.
#[tokio::test]
async fn silent_host_times_out_as_unreachable() {
    // A listener that accepts TCP but never speaks Postgres.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let conn_id = unique("silent");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &airflow_secret("localhost", port, "nobody", &password(), json!({})),
    )
    .await;
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_CONNECT_TIMEOUT", "1s".into())],
        ..Default::default()
    })
    .await;
    let msg = sc
        .get(&format!("/connections/{conn_id}"))
        .await
        .expect_error(503, "database_unreachable")
        .to_string();
    assert!(msg.contains("within"), "{msg}");
    drop(silent);
}

async fn tls_case(
    sslmode: &str,
    rootcert: Option<&std::path::Path>,
    host: &str,
    resolve: bool,
) -> Reply {
    let role = unique("tls");
    let pw = password();
    create_role(&role, &pw).await;
    let conn_id = unique("tls");
    let mut extra = json!({"sslmode": sslmode});
    if let Some(root) = rootcert {
        extra["sslrootcert"] = json!(root.display().to_string());
    }
    let port = env().pg_port;
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &airflow_secret(host, port, &role, &pw, extra),
    )
    .await;
    let mut opts = Options {
        // The operator allows whatever the secret asks for (the default
        // minimum, `require`, is tested below).
        env: vec![
            ("SIDECAR_CONNECT_TIMEOUT", "3s".into()),
            ("SIDECAR_MIN_SSLMODE", "disable".into()),
        ],
        ..Default::default()
    };
    if resolve {
        opts.env
            .push(("SIDECAR_RESOLVE", format!("{host}:{port}=127.0.0.1:{port}")));
    }
    let sc = Sidecar::start(opts).await;
    sc.get(&format!("/connections/{conn_id}")).await
}

#[tokio::test]
async fn verify_full_passes_with_the_right_ca_and_fails_with_another() {
    let ok = tls_case("verify-full", Some(&env().ca_file), "localhost", false).await;
    assert_eq!(ok.status, 200, "{}", ok.text);
    assert_eq!(ok.json["extra"]["sslmode"], "verify-full");
    assert_eq!(
        ok.json["extra"]["sslrootcert"],
        env().ca_file.display().to_string()
    );

    let bad = tls_case(
        "verify-full",
        Some(&env().other_ca_file),
        "localhost",
        false,
    )
    .await;
    let msg = bad.expect_error(503, "database_unreachable");
    assert!(msg.contains("certificate"), "{msg}");
}

#[tokio::test]
async fn verify_ca_ignores_the_name_and_verify_full_does_not() {
    // The certificate does not cover this name; SIDECAR_RESOLVE reaches the server.
    let name = "not-in-the-cert.example";
    let full = tls_case("verify-full", Some(&env().ca_file), name, true).await;
    let msg = full.expect_error(503, "database_unreachable");
    assert!(msg.contains("certificate"), "{msg}");

    let ca = tls_case("verify-ca", Some(&env().ca_file), name, true).await;
    assert_eq!(ca.status, 200, "{}", ca.text);
    assert_eq!(ca.json["host"], name, "the answer keeps the real host");
    assert_eq!(ca.json["extra"]["sslmode"], "verify-ca");
}

#[tokio::test]
async fn require_and_disable_connect_without_verification() {
    let none: Option<&std::path::Path> = None;
    let r = tls_case("disable", none, "localhost", false).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["extra"]["sslmode"], "disable");
    assert!(r.json["extra"].get("sslrootcert").is_none(), "{}", r.text);
    // `require` with a CA file verifies the chain (libpq's rule).
    let r = tls_case("require", Some(&env().other_ca_file), "localhost", false).await;
    r.expect_error(503, "database_unreachable");
    let r = tls_case("prefer", Some(&env().ca_file), "localhost", false).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn resolve_dials_another_address_and_keeps_the_real_host() {
    let r = tls_case(
        "verify-full",
        Some(&env().ca_file),
        "db.demo.internal",
        true,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["host"], "db.demo.internal");
}

/// AWS's single-user rotation: between setSecret and finishSecret only the
/// AWSPENDING password works. Lookups keep answering 200 with it.
#[tokio::test]
async fn rotation_window_serves_awspending_then_awscurrent() {
    let role = unique("rot");
    let old = password();
    let new = password();
    create_role(&role, &old).await;
    let conn_id = unique("rot");
    let secret_id = format!("airflow/connections/{conn_id}");
    let port = env().pg_port;
    put_secret(
        &secret_id,
        &airflow_secret("localhost", port, &role, &old, json!({})),
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&old);
    sc.forbid(&new);
    let path = format!("/connections/{conn_id}");
    let r = sc.get(&path).await;
    assert_eq!(
        (r.status, r.header("x-sidecar-stage")),
        (200, Some("AWSCURRENT"))
    );

    // createSecret: the new version is staged AWSPENDING.
    let pending = put_version(
        &secret_id,
        &airflow_secret("localhost", port, &role, &new, json!({})),
        &["AWSPENDING"],
    )
    .await;
    // setSecret: the database now has the new password; AWSCURRENT is wrong.
    set_password(&role, &new).await;
    let r = sc.get(&format!("{path}?refresh=true")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-stage"), Some("AWSPENDING"));
    assert_eq!(r.json["password"], new.as_str());

    // finishSecret: AWSCURRENT moves to the new version.
    promote(&secret_id, &pending).await;
    let r = sc.get(&format!("{path}?refresh=true")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-stage"), Some("AWSCURRENT"));
    assert_eq!(r.json["password"], new.as_str());
}

/// Alternating users: the previous user still works when the current one is broken.
#[tokio::test]
async fn awsprevious_is_tried_last() {
    let role = unique("prev");
    let good = password();
    create_role(&role, &good).await;
    let conn_id = unique("prev");
    let secret_id = format!("airflow/connections/{conn_id}");
    let port = env().pg_port;
    put_secret(
        &secret_id,
        &airflow_secret("localhost", port, &role, &good, json!({})),
    )
    .await;
    // A new AWSCURRENT whose password Postgres never got.
    put_version(
        &secret_id,
        &airflow_secret("localhost", port, &role, &password(), json!({})),
        &["AWSCURRENT"],
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-stage"), Some("AWSPREVIOUS"));
    assert_eq!(r.json["password"], good.as_str());
}
