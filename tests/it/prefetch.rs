//! Start-up prefetch: configured entries, the `prefetch` list and
//! `prefetch_all` are resolved in the background, bounded in concurrency,
//! without ever holding readiness, and their first lookup is a cache hit.
//! AWS calls are counted by moto's recorder or the fault endpoint; logins
//! from Postgres' log. Progress is read from the sidecar's own log lines.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::faults::{AwsFaults, Fault, SilentListener};
use crate::support::*;

fn pg_secret(host: &str, port: u16, role: &str, pw: &str) -> String {
    json!({"conn_type": "postgres", "host": host, "port": port, "login": role,
           "password": pw, "schema": role})
    .to_string()
}

/// The "prefetch finished" log line, once it is written (within `bound`).
async fn summary(sc: &Sidecar, bound: Duration) -> Value {
    let deadline = Instant::now() + bound;
    loop {
        if let Some(line) = finished_line(sc) {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "prefetch did not finish within {bound:?}; log:\n{}",
            sc.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn finished_line(sc: &Sidecar) -> Option<Value> {
    sc.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["message"] == "prefetch finished")
}

/// Log lines saying one conn_id's prefetch failed.
fn failures(sc: &Sidecar) -> Vec<Value> {
    sc.logs()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["message"] == "prefetch failed")
        .collect()
}

/// Answered from the cache: 200 and no `Server-Timing` (only a lookup that
/// computed its answer carries one).
fn assert_cache_hit(r: &Reply, what: &str) {
    assert_eq!(r.status, 200, "{what}: {}", r.text);
    assert!(
        r.header("server-timing").is_none(),
        "{what} was not answered from the cache: {:?}",
        r.header("server-timing")
    );
}

async fn admin_status(sc: &Sidecar, path: &str) -> u16 {
    reqwest::get(format!("{}{path}", sc.admin_url))
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn entries_and_the_prefetch_list_are_warm_and_failures_stop_nothing() {
    let entry = airflow_json_db().await;
    let listed = airflow_json_db().await;
    // Stored password no longer logs in.
    let rejected = airflow_json_db().await;
    let new_pw = password();
    set_password(&rejected.role, &new_pw).await;
    let missing = unique("missing");

    let sc = Sidecar::start(Options {
        config: Some(format!("[connections.{}]\n", entry.conn_id)),
        env: vec![(
            "SIDECAR_PREFETCH",
            format!("{},{},{}", rejected.conn_id, missing, listed.conn_id),
        )],
        ..Default::default()
    })
    .await;
    for db in [&entry, &listed, &rejected] {
        sc.forbid(&db.password);
    }
    sc.forbid(&new_pw);

    let s = summary(&sc, Duration::from_secs(30)).await;
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(2), Some(2)),
        "{s}"
    );
    let failed = failures(&sc);
    let ids: Vec<&str> = failed
        .iter()
        .filter_map(|l| l["conn_id"].as_str())
        .collect();
    assert!(
        ids.contains(&rejected.conn_id.as_str()) && ids.contains(&missing.as_str()),
        "{failed:?}"
    );
    assert!(failed
        .iter()
        .any(|l| l["error"] == "credentials_rejected"
            && l["cause"].as_str().unwrap().contains("28P01")));

    // Warm: the first lookup is a hit, and costs no more AWS calls or logins.
    for db in [&entry, &listed] {
        let r = sc.get(&format!("/connections/{}", db.conn_id)).await;
        assert_cache_hit(&r, &db.conn_id);
        assert_eq!(r.json["password"], db.password.as_str());
        assert_eq!(aws_calls("GetSecretValue", &db.secret_id).await, 1);
        assert_eq!(logins_of(&db.role), 1);
    }
    // The failures are what a lookup would have got; nothing was served wrongly.
    sc.get(&format!("/connections/{}", rejected.conn_id))
        .await
        .expect_error(503, "credentials_rejected");
    sc.get(&format!("/connections/{missing}"))
        .await
        .expect_error(404, "not_found");
    assert_eq!(logins_of(&rejected.role), 0);
    let m = sc.metrics().await;
    for want in [
        r#"sidecar_prefetch_total{outcome="ok"} 2"#,
        r#"sidecar_prefetch_total{outcome="failed"} 2"#,
    ] {
        assert!(m.contains(want), "{want} in {m}");
    }
}

#[tokio::test]
async fn at_most_prefetch_concurrency_at_once_and_a_silent_database_holds_only_its_slot() {
    let silent = SilentListener::start().await;
    let mut ids = Vec::new();
    let pw = password();
    for _ in 0..3 {
        let id = unique("silent");
        put_secret(
            &format!("airflow/connections/{id}"),
            &pg_secret("127.0.0.1", silent.port, "nobody", &pw),
        )
        .await;
        ids.push(id);
    }
    let good = airflow_json_db().await;
    ids.push(good.conn_id.clone());

    let sc = Sidecar::start(Options {
        env: vec![
            ("SIDECAR_PREFETCH", ids.join(",")),
            ("SIDECAR_PREFETCH_CONCURRENCY", "2".into()),
            ("SIDECAR_CONNECT_TIMEOUT", "6s".into()),
            ("SIDECAR_PREFETCH_ENTRIES", "false".into()),
        ],
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    sc.forbid(&good.password);

    // Two slots, both held by silent databases: the third silent one and
    // the good one wait their turn.
    assert!(eventually(Duration::from_secs(10), || async { silent.accepted() >= 2 }).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(finished_line(&sc).is_none(), "{}", sc.logs());
    assert_eq!(
        silent.accepted(),
        2,
        "more than prefetch_concurrency at once"
    );
    assert_eq!(logins_of(&good.role), 0);
    assert_eq!(admin_status(&sc, "/readyz").await, 200);

    let s = summary(&sc, Duration::from_secs(40)).await;
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(1), Some(3)),
        "{s}"
    );
    assert_eq!(silent.accepted(), 3, "one attempt per silent database");
    assert_eq!(logins_of(&good.role), 1);
    let r = sc.get(&format!("/connections/{}", good.conn_id)).await;
    assert_cache_hit(&r, &good.conn_id);
}

#[tokio::test]
async fn readiness_never_waits_for_a_prefetch_against_a_hanging_aws() {
    // AWS accepts connections and never answers.
    let hang = SilentListener::start().await;
    let ids: Vec<String> = (0..3).map(|_| unique("hang")).collect();
    let sc = Sidecar::start(Options {
        aws_url: Some(format!("http://127.0.0.1:{}", hang.port)),
        env: vec![
            ("SIDECAR_PREFETCH", ids.join(",")),
            ("SIDECAR_AWS_TIMEOUT", "4s".into()),
        ],
        ..Default::default()
    })
    .await;
    assert!(eventually(Duration::from_secs(10), || async { hang.accepted() >= 1 }).await);
    assert_eq!(admin_status(&sc, "/readyz").await, 200);
    assert_eq!(admin_status(&sc, "/livez").await, 200);
    // Ready was answered while the prefetch was still waiting on AWS.
    assert!(finished_line(&sc).is_none(), "{}", sc.logs());

    let s = summary(&sc, Duration::from_secs(30)).await;
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(0), Some(3)),
        "{s}"
    );
    let failed = failures(&sc);
    assert_eq!(failed.len(), 3, "{failed:?}");
    assert!(
        failed
            .iter()
            .all(|l| l["error"] == "timeout" || l["error"] == "upstream_error"),
        "{failed:?}"
    );
    assert_eq!(admin_status(&sc, "/readyz").await, 200);
}

#[tokio::test]
async fn an_id_prefetched_but_never_asked_for_is_not_refreshed() {
    let idle = airflow_json_db().await;
    let busy = airflow_json_db().await;
    let sc = Sidecar::start(Options {
        env: vec![
            (
                "SIDECAR_PREFETCH",
                format!("{},{}", idle.conn_id, busy.conn_id),
            ),
            ("SIDECAR_SECRET_TTL", "1s".into()),
            ("SIDECAR_VALIDATION_TTL", "1s".into()),
        ],
        ..Default::default()
    })
    .await;
    sc.forbid(&idle.password);
    sc.forbid(&busy.password);
    summary(&sc, Duration::from_secs(30)).await;
    let path = format!("/connections/{}", busy.conn_id);
    assert_cache_hit(&sc.get(&path).await, &busy.conn_id);
    // Three TTLs of Airflow asking for one of them.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert_eq!(sc.get(&path).await.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        aws_calls("DescribeSecret", &busy.secret_id).await >= 1,
        "the asked-for id is refreshed ahead"
    );
    assert_eq!(aws_calls("DescribeSecret", &idle.secret_id).await, 0);
    assert_eq!(aws_calls("GetSecretValue", &idle.secret_id).await, 1);
    assert_eq!(logins_of(&idle.role), 1);
}

/// `n` secrets under a fresh prefix, all logging in as one role.
async fn secrets_under_a_prefix(n: usize) -> (String, Vec<String>, String, String) {
    let prefix = format!("pf/{}", unique("p"));
    let role = unique("u");
    let pw = password();
    create_role(&role, &pw).await;
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("c{i:02}");
        put_secret(
            &format!("{prefix}/{id}"),
            &pg_secret("localhost", env().pg_port, &role, &pw),
        )
        .await;
        ids.push(id);
    }
    (prefix, ids, role, pw)
}

#[tokio::test]
async fn prefetch_all_lists_the_prefix_once_and_stops_at_its_bound() {
    let (prefix, ids, role, pw) = secrets_under_a_prefix(5).await;
    let faults = AwsFaults::start().await;
    let sc = Sidecar::start(Options {
        aws_url: Some(faults.url.clone()),
        env: vec![
            ("SIDECAR_CONNECTIONS_PREFIX", prefix.clone()),
            ("SIDECAR_PREFETCH_ALL", "3".into()),
        ],
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    let s = summary(&sc, Duration::from_secs(30)).await;
    assert_eq!(
        (s["ok"].as_u64(), s["list_calls"].as_u64()),
        (Some(3), Some(1)),
        "{s}"
    );
    assert_eq!(faults.calls("ListSecrets"), 1);
    assert_eq!(faults.calls("GetSecretValue"), 3);
    assert_eq!(faults.calls("BatchGetSecretValue"), 0);
    assert_eq!(logins_of(&role), 3);

    let mut hits = 0;
    for id in &ids {
        let r = sc.get(&format!("/connections/{id}")).await;
        assert_eq!(r.status, 200, "{}", r.text);
        hits += usize::from(r.header("server-timing").is_none());
    }
    assert_eq!(hits, 3, "exactly the bound was prefetched");
    assert_eq!(faults.calls("GetSecretValue"), 5);
}

#[tokio::test]
async fn prefetch_batch_fetches_twenty_values_per_call_and_no_get_secret_value() {
    let (prefix, ids, role, pw) = secrets_under_a_prefix(25).await;
    let missing = unique("missing");
    let faults = AwsFaults::start().await;
    let sc = Sidecar::start(Options {
        aws_url: Some(faults.url.clone()),
        env: vec![
            ("SIDECAR_CONNECTIONS_PREFIX", prefix.clone()),
            ("SIDECAR_PREFETCH_ALL", "100".into()),
            ("SIDECAR_PREFETCH", missing.clone()),
            ("SIDECAR_PREFETCH_BATCH", "true".into()),
        ],
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    let s = summary(&sc, Duration::from_secs(60)).await;
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(25), Some(1)),
        "{s}"
    );
    assert_eq!(s["batch_cached"].as_u64(), Some(25), "{s}");
    assert_eq!(faults.calls("ListSecrets"), 1);
    // 26 ids: 20 + 6.
    assert_eq!(faults.calls("BatchGetSecretValue"), 2);
    assert_eq!(faults.calls("GetSecretValue"), 0, "{:?}", faults.log());
    // One login per connection: that is the product.
    assert_eq!(logins_of(&role), 25);
    for id in &ids {
        assert_cache_hit(&sc.get(&format!("/connections/{id}")).await, id);
    }
    // Absent, per the batch, and cached as such.
    sc.get(&format!("/connections/{missing}"))
        .await
        .expect_error(404, "not_found");
    assert_eq!(faults.calls("GetSecretValue"), 0);
}

#[tokio::test]
async fn without_batch_permission_prefetch_falls_back_to_one_call_per_secret() {
    let a = airflow_json_db().await;
    let b = airflow_json_db().await;
    let faults = AwsFaults::start().await;
    faults.on("BatchGetSecretValue", Fault::Deny);
    let sc = Sidecar::start(Options {
        aws_url: Some(faults.url.clone()),
        env: vec![
            ("SIDECAR_PREFETCH", format!("{},{}", a.conn_id, b.conn_id)),
            ("SIDECAR_PREFETCH_BATCH", "true".into()),
        ],
        ..Default::default()
    })
    .await;
    sc.forbid(&a.password);
    sc.forbid(&b.password);
    let s = summary(&sc, Duration::from_secs(30)).await;
    assert_eq!(
        (s["ok"].as_u64(), s["failed"].as_u64()),
        (Some(2), Some(0)),
        "{s}"
    );
    assert_eq!(faults.calls("BatchGetSecretValue"), 1);
    assert_eq!(faults.calls("GetSecretValue"), 2);
    assert!(sc.logs().contains("secretsmanager:BatchGetSecretValue"));
    for db in [&a, &b] {
        assert_cache_hit(
            &sc.get(&format!("/connections/{}", db.conn_id)).await,
            &db.conn_id,
        );
    }
}
