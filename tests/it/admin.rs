//! The admin listener (probes, metrics), request logs, graceful shutdown.

use std::time::Duration;

use crate::support::*;

async fn admin_get(sc: &Sidecar, path: &str) -> (u16, String) {
    let r = reqwest::get(format!("{}{path}", sc.admin_url))
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

/// An AWS outage longer than `max_stale` shows in the metrics, never in the
/// probes: on Airflow 3 a NotReady api-server pod leaves its Service, and
/// with it the Execution API every running task talks to.
#[tokio::test]
async fn an_aws_outage_shows_in_metrics_never_in_readyz_or_livez() {
    let db = airflow_json_db().await;
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
    assert_eq!(admin_get(&sc, "/readyz").await.0, 200);
    assert_ne!(
        sc.get(&format!("/connections/{}", db.conn_id)).await.status,
        200
    );
    // Past max_stale, with every AWS call failing (the old /readyz turned 503 here).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_ne!(sc.get("/connections/two").await.status, 200);
    let (status, body) = admin_get(&sc, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin_get(&sc, "/livez").await.0, 200);
    let (_, text) = admin_get(&sc, "/metrics").await;
    let failed: f64 = text
        .lines()
        .filter(|l| l.starts_with("sidecar_aws_calls_total{") && !l.contains("outcome=\"ok\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        failed >= 2.0,
        "the outage is visible in the metrics:\n{text}"
    );
    assert_eq!(admin_get(&sc, "/nope").await.0, 404);
}

/// No AWS credentials at all (IRSA not wired yet): still ready; the lookups
/// fail with their own clear error and the metrics show it.
#[tokio::test]
async fn readyz_never_asks_aws_for_credentials() {
    let sc = Sidecar::start(Options {
        env: vec![
            ("AWS_ACCESS_KEY_ID", String::new()),
            ("AWS_SECRET_ACCESS_KEY", String::new()),
        ],
        ..Default::default()
    })
    .await;
    let (status, body) = admin_get(&sc, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(admin_get(&sc, "/livez").await.0, 200);
}

/// Readiness is local state: the token file Airflow reads must be there.
#[tokio::test]
async fn readyz_fails_while_the_token_file_is_missing() {
    let sc = Sidecar::start(Options::default()).await;
    assert_eq!(admin_get(&sc, "/readyz").await.0, 200);
    let saved = std::fs::read(&sc.token_file).unwrap();
    std::fs::remove_file(&sc.token_file).unwrap();
    let (status, body) = admin_get(&sc, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("token file"), "{body}");
    assert!(!body.contains(&sc.token), "{body}");
    assert_eq!(admin_get(&sc, "/livez").await.0, 200);
    std::fs::write(&sc.token_file, saved).unwrap();
    assert_eq!(admin_get(&sc, "/readyz").await.0, 200);
}

/// The admin listener serves IPv6 (IPv6-only EKS probes the pod's IPv6
/// address). The `[::]` default itself is exercised in a private network
/// namespace by deploy/pod-e2e, where a wildcard bind reaches nothing else.
#[tokio::test]
async fn admin_listener_serves_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback on this machine");
        return;
    }
    let dir = env().dir.join(unique("admin6"));
    std::fs::create_dir_all(&dir).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, "t0ken\n").unwrap();
    let admin_port = free_port();
    let mut child = std::process::Command::new(bin())
        .arg("serve")
        .envs(base_env(false))
        .env("SIDECAR_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("SIDECAR_ADMIN_LISTEN", format!("[::1]:{admin_port}"))
        .env("SIDECAR_TOKEN_FILE", &token_file)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://[::1]:{admin_port}/readyz");
    let mut status = None;
    for _ in 0..500 {
        if let Ok(r) = reqwest::get(&url).await {
            status = Some(r.status().as_u16());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, Some(200));
}

/// The listener holds at most MAX_CONNECTIONS (64) connections: a flood of
/// idle sockets cannot exhaust file descriptors. The next request is served
/// as soon as one of them goes away.
#[tokio::test]
async fn admin_connections_are_bounded() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sc = Sidecar::start(Options::default()).await;
    let addr: std::net::SocketAddr = sc.admin_url.trim_start_matches("http://").parse().unwrap();
    // Connections from a chosen loopback address, as distinct pods would be.
    let from = |last: u8| async move {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 0, last], 0)))
            .unwrap();
        socket.connect(addr).await.unwrap()
    };
    let get = b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

    // One peer holds at most 8: its 9th connection is closed unanswered ...
    let mut hog = Vec::new();
    for _ in 0..8 {
        hog.push(from(2).await);
    }
    let mut ninth = from(2).await;
    let _ = ninth.write_all(get).await;
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), ninth.read_to_end(&mut buf)).await;
    assert!(
        closed.is_ok() && buf.is_empty(),
        "a peer past its budget is closed: {:?}",
        String::from_utf8_lossy(&buf)
    );
    // ... while the kubelet (another address) is answered at once.
    let mut probe = from(3).await;
    probe.write_all(get).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), probe.read_to_end(&mut buf))
        .await
        .expect("a probe is not starved by another peer")
        .unwrap();
    assert!(String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"));

    // All peers together hold at most 64: one more waits for a free slot.
    for peer in 4..11 {
        for _ in 0..8 {
            hog.push(from(peer).await);
        }
    }
    assert_eq!(hog.len(), 64);
    let mut extra = from(11).await;
    extra.write_all(get).await.unwrap();
    let mut buf = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(500), extra.read_to_end(&mut buf)).await;
    assert!(
        early.is_err() && buf.is_empty(),
        "answered past the bound: {:?}",
        String::from_utf8_lossy(&buf)
    );
    drop(hog.pop());
    tokio::time::timeout(Duration::from_secs(10), extra.read_to_end(&mut buf))
        .await
        .expect("answered once a slot freed")
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
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
        "sidecar_lookups_total{kind=\"connection\",outcome=\"ok\",validated=\"true\"} 3",
        "sidecar_lookups_total{kind=\"connection\",outcome=\"not_found\",validated=\"none\"} 1",
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

/// A scraper that keeps its connection alive between scrapes must never
/// reuse one the listener is closing (CI saw `IncompleteMessage` on a
/// `/metrics` scrape that met the idle timeout): every answer says
/// `Connection: close`, and a second request on the same socket gets none.
#[tokio::test]
async fn admin_answers_close_their_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sc = Sidecar::start(Options::default()).await;
    for path in ["/livez", "/readyz", "/metrics"] {
        let r = reqwest::get(format!("{}{path}", sc.admin_url))
            .await
            .unwrap();
        assert_eq!(
            r.headers().get("connection").map(|v| v.to_str().unwrap()),
            Some("close"),
            "{path}"
        );
    }
    // Two pipelined requests on one socket: one answer, then EOF.
    let addr = sc.admin_url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\nGET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the listener closes after one answer")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
}
