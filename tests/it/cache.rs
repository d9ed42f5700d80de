//! Caching: single-flight, TTLs, negative cache, stale-if-error, refresh-ahead,
//! and a rotation done while a client keeps asking.
//! AWS calls are counted from moto's recorder; logins from Postgres' log.

use std::time::{Duration, Instant};

use crate::faults::{AwsFaults, Fault};
use crate::support::*;
use serde_json::json;

fn fast_ttls() -> Vec<(&'static str, String)> {
    vec![
        ("SIDECAR_SECRET_TTL", "1s".into()),
        ("SIDECAR_VALIDATION_TTL", "1s".into()),
        ("SIDECAR_ERROR_TTL", "500ms".into()),
    ]
}

#[tokio::test]
async fn concurrent_cold_lookups_make_one_aws_call_and_one_login() {
    let db = airflow_json_db().await;
    let sc = std::sync::Arc::new(Sidecar::start(Options::default()).await);
    let path = format!("/connections/{}", db.conn_id);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let sc = sc.clone();
        let path = path.clone();
        tasks.spawn(async move { sc.get(&path).await });
    }
    let replies: Vec<Reply> = tasks.join_all().await;
    assert!(
        replies.iter().all(|r| r.status == 200),
        "{:?}",
        replies.iter().find(|r| r.status != 200)
    );
    assert!(
        replies.iter().all(|r| r.text == replies[0].text),
        "all answers identical"
    );
    assert_eq!(aws_calls("GetSecretValue", &db.secret_id).await, 1);
    assert_eq!(logins_of(&db.role), 1);

    // Within the TTLs: no AWS call, no login.
    for _ in 0..50 {
        assert_eq!(sc.get(&path).await.status, 200);
    }
    assert_eq!(aws_calls("GetSecretValue", &db.secret_id).await, 1);
    assert_eq!(logins_of(&db.role), 1);
    let metrics = sc.metrics().await;
    assert!(
        metrics.contains("sidecar_cache_requests_total{result=\"hit\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn refresh_true_bypasses_every_cache() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    let path = format!("/connections/{}", db.conn_id);
    assert_eq!(sc.get(&path).await.status, 200);
    assert_eq!(sc.get(&format!("{path}?refresh=true")).await.status, 200);
    assert_eq!(aws_calls("GetSecretValue", &db.secret_id).await, 2);
    assert_eq!(logins_of(&db.role), 2);
}

#[tokio::test]
async fn missing_ids_are_negative_cached() {
    let sc = std::sync::Arc::new(Sidecar::start(Options::default()).await);
    let conn_id = unique("never");
    let secret_id = format!("airflow/connections/{conn_id}");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let sc = sc.clone();
        let path = format!("/connections/{conn_id}");
        tasks.spawn(async move { sc.get(&path).await.status });
    }
    assert!(tasks.join_all().await.iter().all(|s| *s == 404));
    for _ in 0..50 {
        assert_eq!(sc.get(&format!("/connections/{conn_id}")).await.status, 404);
    }
    assert_eq!(aws_calls("GetSecretValue", &secret_id).await, 1);
}

/// A sidecar whose AWS goes through an [`AwsFaults`] endpoint, with one
/// connection cached. `aws.on("*", Fault::Cut)` is AWS going away (every
/// call's connection dropped unanswered), `aws.clear()` its coming back.
async fn warm_sidecar_behind_faults() -> (Db, AwsFaults, Sidecar) {
    let db = airflow_json_db().await;
    let aws = AwsFaults::start().await;
    let mut env = fast_ttls();
    env.push(("SIDECAR_AWS_TIMEOUT", "2s".into()));
    let sc = Sidecar::start(Options {
        env,
        aws_url: Some(aws.url.clone()),
        ..Default::default()
    })
    .await;
    assert_eq!(
        sc.get(&format!("/connections/{}", db.conn_id)).await.status,
        200
    );
    (db, aws, sc)
}

#[tokio::test]
async fn aws_outage_serves_cached_credentials_that_still_log_in() {
    let (db, aws, sc) = warm_sidecar_behind_faults().await;
    let path = format!("/connections/{}", db.conn_id);

    aws.on("*", Fault::Cut);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = sc.get(&path).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-stale"), Some("true"));
    assert!(r.header("x-sidecar-age").unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(r.json["password"], db.password.as_str());

    // Never seen before: nothing to fall back on.
    let other = unique("uncached");
    let r = sc.get(&format!("/connections/{other}")).await;
    assert!(r.status == 502 || r.status == 504, "{}", r.text);
    assert!(r.json["message"]
        .as_str()
        .unwrap()
        .contains("GetSecretValue"));
    assert!(sc.metrics().await.contains("sidecar_stale_serves_total"));

    // AWS comes back: fresh answers again, without a restart.
    aws.clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = sc.get(&path).await;
        if r.status == 200 && r.header("x-sidecar-stale").is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "did not recover: {}", r.text);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn a_stale_credential_that_no_longer_logs_in_is_not_served() {
    let (db, aws, sc) = warm_sidecar_behind_faults().await;
    let path = format!("/connections/{}", db.conn_id);
    aws.on("*", Fault::Cut);
    set_password(&db.role, &password()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = sc.get(&path).await;
    assert!(r.status == 502 || r.status == 504, "{}", r.text);
    assert!(!r.text.contains(&db.password));
}

#[tokio::test]
async fn refresh_ahead_keeps_lookups_off_the_slow_path() {
    let db = airflow_json_db().await;
    // 8 s: each refresh gets 1.6 s before expiry. A busy CI machine with
    // eight tests at once took ~1 s for a version check and a login, more
    // than the 1 s that 2 s TTLs leave.
    let sc = Sidecar::start(Options {
        env: vec![
            ("SIDECAR_SECRET_TTL", "8s".into()),
            ("SIDECAR_VALIDATION_TTL", "8s".into()),
        ],
        ..Default::default()
    })
    .await;
    let path = format!("/connections/{}", db.conn_id);
    let started = Instant::now();
    // Two expiries (two refreshes) pass.
    while started.elapsed() < Duration::from_secs(17) {
        assert_eq!(sc.get(&path).await.status, 200);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let metrics = sc.metrics().await;
    // Only the first lookup missed; expiries were handled in the background.
    assert!(
        metrics.contains("sidecar_cache_requests_total{result=\"miss\"} 1\n"),
        "{metrics}"
    );
    // Version checks by DescribeSecret, not GetSecretValue, and re-proven logins.
    assert!(aws_calls("DescribeSecret", &db.secret_id).await >= 2);
    assert_eq!(aws_calls("GetSecretValue", &db.secret_id).await, 1);
    assert!(logins_of(&db.role) >= 3);
}

/// put AWSPENDING → change the password in Postgres → move AWSCURRENT, while
/// a client keeps asking: every answer is 200, and once the validation TTL has
/// passed since the password change, no answer carries the dead password.
#[tokio::test]
async fn rotation_under_load_answers_200_and_drops_the_dead_password() {
    let db = airflow_json_db().await;
    let sc = std::sync::Arc::new(
        Sidecar::start(Options {
            env: fast_ttls(),
            ..Default::default()
        })
        .await,
    );
    sc.forbid(&db.password);
    let path = format!("/connections/{}", db.conn_id);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (sc, path, stop) = (sc.clone(), path.clone(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let at = Instant::now();
                let r = sc.get(&path).await;
                seen.push((
                    at,
                    r.status,
                    r.json["password"].as_str().unwrap_or("").to_string(),
                    r.text,
                ));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let new = password();
    sc.forbid(&new);
    let value = |pw: &str| {
        json!({"conn_type": "postgres", "host": "localhost", "port": env().pg_port,
               "login": db.role, "password": pw, "schema": db.role})
        .to_string()
    };
    let pending = put_version(&db.secret_id, &value(&new), &["AWSPENDING"]).await;
    set_password(&db.role, &new).await;
    let changed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    promote(&db.secret_id, &pending).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = client.await.unwrap();
    assert!(
        seen.len() > 50,
        "the client kept asking ({} lookups)",
        seen.len()
    );
    for (_, status, _, text) in &seen {
        assert_eq!(*status, 200, "{text}");
    }
    // The validation TTL (1s), plus a little for a lookup already in flight.
    let bound = changed_at + Duration::from_millis(1300);
    let late: Vec<_> = seen.iter().filter(|(at, ..)| *at > bound).collect();
    assert!(!late.is_empty());
    assert!(
        late.iter().all(|(_, _, pw, _)| *pw == new),
        "a dead password was served after the validation TTL"
    );
    assert_eq!(seen.last().unwrap().2, new);
}
