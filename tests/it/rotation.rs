//! Rotation checks (HTTP and CLI), driven through a real rotation sequence:
//! put AWSPENDING → ALTER ROLE in Postgres → move AWSCURRENT. And variables.

use crate::support::*;
use serde_json::{json, Value};

struct Rotating {
    db: Db,
}

fn value(role: &str, pw: &str) -> String {
    json!({"conn_type": "postgres", "host": "localhost", "port": env().pg_port,
           "login": role, "password": pw, "schema": role})
    .to_string()
}

impl Rotating {
    async fn new() -> Self {
        Rotating {
            db: airflow_json_db().await,
        }
    }
    fn check_cli(&self, extra: &[(&str, String)]) -> (i32, Value) {
        let (code, out, err) = cli(&["rotation-check", &self.db.conn_id, "--json"], extra);
        let report = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
        (code, report)
    }
}

async fn check(sc: &Sidecar, conn_id: &str) -> Value {
    let r = sc
        .post(&format!("/connections/{conn_id}/rotation-check"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.json
}

fn stage<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == name)
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

#[tokio::test]
async fn verdicts_through_a_single_user_rotation() {
    let r = Rotating::new().await;
    let db = &r.db;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&db.password);

    // Nothing in flight.
    let report = check(&sc, &db.conn_id).await;
    assert_eq!(report["verdict"], "ok", "{report}");
    assert_eq!(stage(&report, "AWSCURRENT")["login"], "ok");
    assert_eq!(report["served"]["stage"], "AWSCURRENT");
    assert_eq!(report["rotation_enabled"], false);
    let (code, cli_report) = r.check_cli(&[]);
    assert_eq!((code, cli_report["verdict"].as_str()), (0, Some("ok")));

    // createSecret: AWSPENDING staged, the database unchanged.
    let new = password();
    sc.forbid(&new);
    let pending = put_version(&db.secret_id, &value(&db.role, &new), &["AWSPENDING"]).await;
    let report = check(&sc, &db.conn_id).await;
    assert_eq!(report["verdict"], "rotation_in_progress", "{report}");
    assert_eq!(stage(&report, "AWSPENDING")["version_id"], pending.as_str());
    assert_eq!(stage(&report, "AWSPENDING")["login"], "rejected");
    let err = stage(&report, "AWSPENDING")["error"].as_str().unwrap();
    assert!(err.contains("28P01"), "{err}");
    let (code, _) = r.check_cli(&[]);
    assert_eq!(code, 0, "rotation_in_progress needs no action");

    // setSecret: the database has the new password; AWSCURRENT is now wrong.
    set_password(&db.role, &new).await;
    let report = check(&sc, &db.conn_id).await;
    assert_eq!(report["verdict"], "current_rejected_pending_ok", "{report}");
    assert_eq!(report["served"]["stage"], "AWSPENDING");
    assert!(!report.to_string().contains(&new) && !report.to_string().contains(&db.password));
    // The cache now serves AWSPENDING without a refresh.
    let got = sc.get(&format!("/connections/{}", db.conn_id)).await;
    assert_eq!(got.header("x-sidecar-stage"), Some("AWSPENDING"));
    assert_eq!(got.json["password"], new.as_str());
    let (code, cli_report) = r.check_cli(&[]);
    assert_ne!(code, 0);
    assert_eq!(cli_report["verdict"], "current_rejected_pending_ok");

    // finishSecret: AWSCURRENT moves; AWSPENDING on the same version is no
    // rotation, and the cache already holds that version.
    promote(&db.secret_id, &pending).await;
    let report = check(&sc, &db.conn_id).await;
    assert_eq!(report["verdict"], "ok", "{report}");
    assert_eq!(report["served"]["version_id"], pending.as_str());
    assert_eq!(report["served"]["stage"], "AWSCURRENT");
    assert!(stage(&report, "AWSPREVIOUS")["login"] == "rejected");

    // Nothing logs in any more.
    set_password(&db.role, &password()).await;
    let report = check(&sc, &db.conn_id).await;
    assert_eq!(report["verdict"], "current_rejected", "{report}");
    assert!(report["served"].is_null());
    sc.get(&format!("/connections/{}", db.conn_id))
        .await
        .expect_error(503, "credentials_rejected");
    let (code, _) = r.check_cli(&[]);
    assert_ne!(code, 0);

    let metrics = sc.metrics().await;
    for v in [
        "ok",
        "rotation_in_progress",
        "current_rejected_pending_ok",
        "current_rejected",
    ] {
        assert!(
            metrics.contains(&format!("sidecar_rotation_checks_total{{verdict=\"{v}\"}}")),
            "{v}: {metrics}"
        );
    }
}

#[tokio::test]
async fn stale_cache_is_refreshed_by_a_check() {
    let r = Rotating::new().await;
    let db = &r.db;
    let sc = Sidecar::start(Options::default()).await;
    let path = format!("/connections/{}", db.conn_id);
    assert_eq!(sc.get(&path).await.json["password"], db.password.as_str());
    // A new AWSCURRENT the cache has not seen (the old password still works too).
    let new = password();
    let role2 = unique("u2");
    create_role(&role2, &new).await;
    put_version(&db.secret_id, &value(&role2, &new), &["AWSCURRENT"]).await;
    assert_eq!(
        sc.get(&path).await.json["password"],
        db.password.as_str(),
        "cached"
    );
    let report = check(&sc, &db.conn_id).await;
    assert_eq!(report["verdict"], "refreshed_stale_cache", "{report}");
    assert_eq!(sc.get(&path).await.json["password"], new.as_str());
}

#[tokio::test]
async fn a_pending_version_left_too_long_is_a_stuck_rotation() {
    let r = Rotating::new().await;
    let db = &r.db;
    put_version(
        &db.secret_id,
        &value(&db.role, &password()),
        &["AWSPENDING"],
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let (code, report) = r.check_cli(&[("SIDECAR_ROTATION_STUCK_AFTER", "1s".into())]);
    assert_eq!(report["verdict"], "rotation_stuck", "{report}");
    assert!(report["message"].as_str().unwrap().contains("AWSPENDING"));
    assert_ne!(code, 0);
    // With the default threshold (1h) it is a rotation in progress.
    let (code, report) = r.check_cli(&[]);
    assert_eq!(
        (code, report["verdict"].as_str()),
        (0, Some("rotation_in_progress"))
    );
}

#[tokio::test]
async fn unreachable_database_verdict_and_text_output() {
    let conn_id = unique("rotdown");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &json!({"login": "x", "password": password(), "host": "localhost", "port": closed_port()})
            .to_string(),
    )
    .await;
    let (code, out, err) = cli(
        &["rotation-check", &conn_id],
        &[("SIDECAR_CONNECT_TIMEOUT", "2s".into())],
    );
    assert_ne!(code, 0, "{err}");
    assert!(out.contains("verdict: database_unreachable"), "{out}");
    assert!(out.contains("AWSCURRENT"), "{out}");
}

#[tokio::test]
async fn rotation_check_of_a_missing_or_invalid_id() {
    let sc = Sidecar::start(Options::default()).await;
    sc.post(&format!("/connections/{}/rotation-check", unique("none")))
        .await
        .expect_error(404, "not_found");
    sc.post("/connections/bad%20id/rotation-check")
        .await
        .expect_error(400, "invalid_conn_id");
    sc.get("/connections/x/rotation-check")
        .await
        .expect_error(405, "method_not_allowed");
}

#[tokio::test]
async fn rds_managed_secret_reports_its_rds_status_and_all_checks_every_entry() {
    let instance = unique("rotmanaged").replace('_', "-");
    rds()
        .await
        .create_db_instance()
        .db_instance_identifier(&instance)
        .db_instance_class("db.t3.micro")
        .engine("postgres")
        .allocated_storage(20)
        .port(env().pg_port as i32)
        .master_username("rotmaster")
        .manage_master_user_password(true)
        .send()
        .await
        .unwrap();
    let db = airflow_json_db().await;
    let config = format!(
        "[connections.managed_rot]\ndb_instance = \"{instance}\"\nsslmode = \"verify-ca\"\n\n[connections.plain_rot]\nsecret_id = \"{}\"\n",
        db.secret_id
    );
    let host = rds()
        .await
        .describe_db_instances()
        .db_instance_identifier(&instance)
        .send()
        .await
        .unwrap()
        .db_instances()[0]
        .endpoint()
        .unwrap()
        .address()
        .unwrap()
        .to_string();
    let port = env().pg_port;
    let dir = env().dir.join(unique("rotcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    std::fs::write(&file, config).unwrap();
    let cfg_env = vec![
        ("SIDECAR_CONFIG", file.display().to_string()),
        ("SIDECAR_RESOLVE", format!("{host}:{port}=127.0.0.1:{port}")),
    ];
    let (code, out, err) = cli(&["rotation-check", "--all", "--json"], &cfg_env);
    let reports: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out} {err}"));
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2, "{reports:?}");
    let managed = reports
        .iter()
        .find(|r| r["conn_id"] == "managed_rot")
        .unwrap();
    assert_eq!(managed["rds_master_secret_status"], "active", "{managed}");
    // The managed user does not exist in Postgres: nothing logs in.
    assert_eq!(managed["verdict"], "current_rejected", "{managed}");
    let plain = reports
        .iter()
        .find(|r| r["conn_id"] == "plain_rot")
        .unwrap();
    assert_eq!(plain["verdict"], "ok", "{plain}");
    assert_ne!(code, 0, "one connection needs action");
}

#[tokio::test]
async fn variables_present_missing_and_prefixed() {
    let key = unique("var");
    let text = format!("some value {}", unique("v"));
    put_secret(&format!("airflow/variables/{key}"), &text).await;
    let sc = Sidecar::start(Options::default()).await;
    let r = sc.get(&format!("/variables/{key}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json, json!({"value": text}));
    assert_eq!(r.header("cache-control"), Some("no-store"));

    let missing = unique("novar");
    for _ in 0..5 {
        let msg = sc
            .get(&format!("/variables/{missing}"))
            .await
            .expect_error(404, "not_found")
            .to_string();
        assert!(
            msg.contains(&format!("airflow/variables/{missing}")),
            "{msg}"
        );
    }
    assert_eq!(
        aws_calls("GetSecretValue", &format!("airflow/variables/{missing}")).await,
        1
    );
    sc.get("/variables/bad%2Fkey")
        .await
        .expect_error(400, "invalid_conn_id");
    sc.request(
        reqwest::Method::GET,
        &format!("/variables/{key}"),
        None,
        &[],
    )
    .await
    .expect_error(401, "unauthorized");

    let prefixed = unique("pvar");
    put_secret(&format!("team/vars/{prefixed}"), "42").await;
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_VARIABLES_PREFIX", "team/vars/".into())],
        ..Default::default()
    })
    .await;
    assert_eq!(
        sc.get(&format!("/variables/{prefixed}")).await.json["value"],
        "42"
    );
}
