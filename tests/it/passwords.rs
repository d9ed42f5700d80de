//! No password over a channel whose server was not verified (issue 19):
//! a fake server in the middle asks for a cleartext or MD5 password and
//! records what it gets; a real Postgres with `password` auth shows that
//! verified TLS still logs in as Airflow will.

use crate::fake_pg::{Ask, FakePostgres};
use crate::support::*;

/// A secret pointing at `port` on localhost, with `extra`.
async fn secret_at(port: u16, extra: serde_json::Value) -> (String, String) {
    let conn_id = unique("mitm");
    let pw = password();
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &serde_json::json!({
            "conn_type": "postgres", "host": "localhost", "port": port,
            "login": "victim", "password": pw, "schema": "app", "extra": extra,
        })
        .to_string(),
    )
    .await;
    (conn_id, pw)
}

/// Nothing the fake received holds the password or a password message.
fn got_nothing(fake: &FakePostgres, pw: &str) {
    let got = fake.received_after_ask();
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains(pw), "the password reached the fake server");
    assert!(
        !got.starts_with(b"p"),
        "a password message reached the fake server: {got:?}"
    );
}

/// A sidecar (`options` for the new conn_id) looks up a secret pointing at
/// `fake`, which asks for a password: the answer is `password_withheld`, and
/// the fake got as far as asking and received nothing.
async fn withheld(
    fake: &FakePostgres,
    extra: serde_json::Value,
    options: impl FnOnce(&str) -> Options<'static>,
) -> (Sidecar, String, String) {
    let (conn_id, pw) = secret_at(fake.port, extra).await;
    let sc = Sidecar::start(options(&conn_id)).await;
    sc.forbid(&pw);
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    let msg = r.expect_error(503, "password_withheld");
    assert!(
        msg.contains(&conn_id) && msg.contains("not verified"),
        "{msg}"
    );
    assert_eq!(fake.asked(), 1, "the fake got as far as asking");
    got_nothing(fake, &pw);
    (sc, conn_id, pw)
}

fn entry(conn_id: &str, sslmode: &str) -> String {
    format!("[connections.{conn_id}]\nsslmode = \"{sslmode}\"\n")
}

#[tokio::test]
async fn a_secret_asking_for_require_is_raised_to_verify_full_with_a_ca() {
    let e = env();
    let fake = FakePostgres::start(
        Some((&e.wrong_name_cert, &e.wrong_name_key)),
        Ask::Cleartext,
    )
    .await;
    let (conn_id, pw) = secret_at(fake.port, serde_json::json!({"sslmode": "require"})).await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&pw);
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    let msg = r.expect_error(503, "database_unreachable");
    assert!(!msg.contains(&pw));
    assert_eq!(fake.asked(), 0, "the certificate's name was checked first");
    got_nothing(&fake, &pw);
}

#[tokio::test]
async fn below_the_floor_by_the_operators_word_a_password_is_still_never_sent() {
    let e = env();
    for ask in [Ask::Cleartext, Ask::Md5] {
        // A certificate from the right CA for another name: chain verified, identity not.
        let fake = FakePostgres::start(Some((&e.wrong_name_cert, &e.wrong_name_key)), ask).await;
        withheld(&fake, serde_json::json!({}), |id| Options {
            config: Some(entry(id, "require")),
            ..Default::default()
        })
        .await;
    }
}

#[tokio::test]
async fn without_a_ca_a_self_signed_server_gets_nothing() {
    let e = env();
    for ask in [Ask::Cleartext, Ask::Md5] {
        let fake = FakePostgres::start(Some((&e.self_signed_cert, &e.self_signed_key)), ask).await;
        let no_ca = |_: &str| Options {
            unset: vec!["SIDECAR_SSLROOTCERT"],
            ..Default::default()
        };
        let (sc, conn_id, pw) =
            withheld(&fake, serde_json::json!({"sslmode": "require"}), no_ca).await;
        // The rotation check meets the same server and says so.
        let r = sc
            .post(&format!("/connections/{conn_id}/rotation-check"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["verdict"], "database_unreachable", "{}", r.text);
        got_nothing(&fake, &pw);
    }
}

#[tokio::test]
async fn without_tls_a_server_asking_for_a_password_gets_nothing() {
    for ask in [Ask::Cleartext, Ask::Md5] {
        let fake = FakePostgres::start(None, ask).await;
        withheld(&fake, serde_json::json!({}), |id| Options {
            config: Some(entry(id, "disable")),
            ..Default::default()
        })
        .await;
        // And a secret cannot ask for plaintext: raised to the floor, so TLS is
        // asked for and this server (which declines it) is never logged in to.
        let fake = FakePostgres::start(None, ask).await;
        let (conn_id, pw) = secret_at(fake.port, serde_json::json!({"sslmode": "disable"})).await;
        let sc = Sidecar::start(Options::default()).await;
        let r = sc.get(&format!("/connections/{conn_id}")).await;
        r.expect_error(503, "database_unreachable");
        assert_eq!(fake.asked(), 0);
        got_nothing(&fake, &pw);
    }
}

/// A role whose server asks for its password in cleartext (pg_hba
/// `password`, TLS only): fine over verified TLS, withheld otherwise.
#[tokio::test]
async fn password_auth_over_verified_tls_logs_in() {
    let role = unique("pwauth");
    let pw = password();
    create_role(&role, &pw).await;
    pg_admin()
        .await
        .batch_execute(&format!("GRANT pw_auth TO \"{role}\""))
        .await
        .unwrap();
    let conn_id = unique("pwauth");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &serde_json::json!({
            "conn_type": "postgres", "host": "localhost", "port": env().pg_port,
            "login": role, "password": pw, "schema": role,
        })
        .to_string(),
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&pw);
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-validated"), Some("true"));
    assert_eq!(r.json["extra"]["sslmode"], "verify-full");
    assert!(r.json["extra"].get("channel_binding").is_none());

    // The same server, not verified (the operator's entry says require): withheld.
    let before = logins_of(&role);
    let sc = Sidecar::start(Options {
        config: Some(entry(&conn_id, "require")),
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    r.expect_error(503, "password_withheld");
    assert_eq!(logins_of(&role), before, "no login happened");
}

/// Without a CA the real server is logged in to with SCRAM and channel
/// binding, and the answer asks Airflow's libpq for the same.
#[tokio::test]
async fn without_a_ca_scram_with_channel_binding_logs_in() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options {
        unset: vec!["SIDECAR_SSLROOTCERT"],
        ..Default::default()
    })
    .await;
    sc.forbid(&db.password);
    let r = sc.get(&format!("/connections/{}", db.conn_id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-validated"), Some("true"));
    assert_eq!(r.json["extra"]["sslmode"], "require");
    assert_eq!(r.json["extra"]["channel_binding"], "require");
    assert!(r.json["extra"].get("sslrootcert").is_none());
}

/// A server that floods the login with one endless message is cut off
/// before the login buffers it.
#[tokio::test]
async fn a_server_flooding_the_login_is_cut_off() {
    let e = env();
    let fake =
        FakePostgres::start(Some((&e.self_signed_cert, &e.self_signed_key)), Ask::Flood).await;
    let (conn_id, pw) = secret_at(fake.port, serde_json::json!({})).await;
    let sc = Sidecar::start(Options {
        unset: vec!["SIDECAR_SSLROOTCERT"],
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    let before = sc.rss_kib();
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    let msg = r.expect_error(503, "database_unreachable");
    assert!(msg.contains("longer than"), "{msg}");
    let grown = sc.rss_kib().saturating_sub(before);
    assert!(grown < 64 * 1024, "the sidecar grew by {grown} KiB");
}

/// Without a verified server, a login that is let in without a password
/// proves nothing, and SCRAM at one iteration would hand over a proof that
/// is guessed offline at no cost: both refused, nothing proven or sent.
#[tokio::test]
async fn an_unverified_server_cannot_fake_a_login_or_weaken_scram() {
    // No TLS (the entry's choice), so channel binding cannot help: the guard must.
    let fake = FakePostgres::start(None, Ask::Trust).await;
    let (conn_id, pw) = secret_at(fake.port, serde_json::json!({})).await;
    let sc = Sidecar::start(Options {
        config: Some(entry(&conn_id, "disable")),
        ..Default::default()
    })
    .await;
    let msg = sc
        .get(&format!("/connections/{conn_id}"))
        .await
        .expect_error(503, "password_withheld")
        .to_string();
    assert!(msg.contains("without any password"), "{msg}");
    got_nothing(&fake, &pw);

    let fake = FakePostgres::start(None, Ask::WeakScram).await;
    let (conn_id, pw) = secret_at(fake.port, serde_json::json!({})).await;
    let sc = Sidecar::start(Options {
        config: Some(entry(&conn_id, "disable")),
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    let msg = sc
        .get(&format!("/connections/{conn_id}"))
        .await
        .expect_error(503, "password_withheld")
        .to_string();
    assert!(msg.contains("4096 iterations"), "{msg}");
    let got = String::from_utf8_lossy(&fake.received_after_ask()).into_owned();
    assert!(
        got.contains("n,,n=,r="),
        "the client's first SCRAM message came: {got:?}"
    );
    assert!(
        !got.contains(",p="),
        "a client proof reached the fake: {got:?}"
    );
    assert!(!got.contains(&pw));
}
