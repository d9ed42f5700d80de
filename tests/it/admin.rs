//! The admin listener (probes, metrics), request logs, graceful shutdown.

use std::time::Duration;

use crate::support::*;

async fn admin_get(sc: &Sidecar, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("{}{path}", sc.admin_url))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test]
async fn livez_never_depends_on_aws_and_readyz_reports_why() {
    let sc = Sidecar::start(Options {
        aws_down: true,
        env: vec![
            ("SIDECAR_MAX_STALE", "1s".into()),
            ("SIDECAR_AWS_TIMEOUT", "1s".into()),
            ("SIDECAR_ERROR_TTL", "100ms".into()),
        ],
        ..Default::default()
    })
    .await;
    assert_eq!(admin_get(&sc, "/livez").await.0, 200);
    assert_eq!(
        admin_get(&sc, "/readyz").await.0,
        200,
        "no AWS call has failed yet"
    );
    sc.get("/connections/one").await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    sc.get("/connections/two").await;
    let (status, body) = admin_get(&sc, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("max_stale"), "{body}");
    assert_eq!(
        admin_get(&sc, "/livez").await.0,
        200,
        "liveness is unaffected"
    );
    assert_eq!(admin_get(&sc, "/nope").await.0, 404);
}

#[tokio::test]
async fn readyz_fails_without_aws_credentials() {
    let sc = Sidecar::start(Options {
        env: vec![
            ("AWS_ACCESS_KEY_ID", String::new()),
            ("AWS_SECRET_ACCESS_KEY", String::new()),
        ],
        ..Default::default()
    })
    .await;
    let (status, body) = admin_get(&sc, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("credentials"), "{body}");
    assert_eq!(admin_get(&sc, "/livez").await.0, 200);
}

#[tokio::test]
async fn metrics_move_and_carry_no_secret() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    for _ in 0..3 {
        assert_eq!(
            sc.get(&format!("/connections/{}", db.conn_id)).await.status,
            200
        );
    }
    sc.get(&format!("/connections/{}", unique("absent"))).await;
    let (status, text) = admin_get(&sc, "/metrics").await;
    assert_eq!(status, 200);
    for want in [
        "sidecar_lookups_total{kind=\"connection\",outcome=\"ok\"} 3",
        "sidecar_lookups_total{kind=\"connection\",outcome=\"not_found\"} 1",
        "sidecar_cache_requests_total{result=\"hit\"} 2",
        "sidecar_cache_requests_total{result=\"miss\"} 2",
        "sidecar_aws_calls_total{api=\"GetSecretValue\",outcome=\"ok\"} 1",
        "sidecar_aws_calls_total{api=\"GetSecretValue\",outcome=\"not_found\"} 1",
        "sidecar_validations_total{outcome=\"ok\"} 1",
        "sidecar_validation_seconds_count 1",
        "sidecar_build_info{version=",
    ] {
        assert!(text.contains(want), "missing {want:?} in\n{text}");
    }
    assert!(
        text.contains(&format!(
            "sidecar_secret_age_seconds{{conn_id=\"{}\"}}",
            db.conn_id
        )),
        "{text}"
    );
    assert!(!text.contains(&db.password));
}

#[tokio::test]
async fn one_json_log_line_per_request_with_outcome_and_stage() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&db.password);
    assert_eq!(
        sc.get(&format!("/connections/{}", db.conn_id)).await.status,
        200
    );
    sc.get("/connections/bad%20id").await;
    let lines: Vec<serde_json::Value> = sc
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["message"] == "request")
        .collect();
    let ok = lines
        .iter()
        .find(|v| v["id"] == db.conn_id.as_str())
        .expect("a request line");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["stage"], "AWSCURRENT");
    assert!(ok["latency_us"].is_u64());
    assert!(
        lines
            .iter()
            .any(|v| v["status"] == 400 && v["outcome"] == "invalid_conn_id"),
        "{lines:?}"
    );
}

/// SIGTERM: stop accepting, let the request in flight finish, exit 0.
#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let conn_id = unique("inflight");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &serde_json::json!({"login": "u", "password": password(), "host": "localhost", "port": port}).to_string(),
    )
    .await;
    let mut sc = Sidecar::start(Options {
        env: vec![("SIDECAR_CONNECT_TIMEOUT", "2s".into())],
        ..Default::default()
    })
    .await;
    let url = format!("{}/connections/{conn_id}", sc.url);
    let token = sc.token.clone();
    let in_flight = tokio::spawn(async move {
        reqwest::Client::new()
            .get(url)
            .header("X-Sidecar-Token", token)
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = tokio::task::spawn_blocking(move || {
        let s = sc.terminate();
        (s, sc)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "{:?}", status.0);
    assert_eq!(
        in_flight.await.unwrap().unwrap(),
        503,
        "the in-flight lookup got its answer"
    );
    drop(silent);
}
