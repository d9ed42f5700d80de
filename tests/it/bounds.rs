//! Bounded work and `/config` off by default (issue 19): clients that send
//! ids and hang up cannot start unbounded work against AWS, and `/config`
//! serves only the options the operator listed.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::faults::{AwsFaults, Fault};
use crate::support::*;

/// Send `GET path` with the token and hang up at once, without reading.
async fn ask_and_leave(sc: &Sidecar, path: &str) {
    let addr = sc.url.trim_start_matches("http://");
    let Ok(mut conn) = tokio::net::TcpStream::connect(addr).await else {
        return;
    };
    let get = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nX-Sidecar-Token: {}\r\n\r\n",
        sc.token
    );
    let _ = conn.write_all(get.as_bytes()).await;
}

#[tokio::test]
async fn clients_that_hang_up_cannot_start_unbounded_work() {
    let faults = AwsFaults::start().await;
    faults.on("*", Fault::Hang);
    let sc = Sidecar::start(Options {
        aws_url: Some(faults.url.clone()),
        env: vec![
            ("SIDECAR_MAX_IN_FLIGHT", "8".into()),
            // Long enough that the first resolutions still hold their slots
            // when the last of 2,000 requests is in, on a loaded machine too.
            ("SIDECAR_AWS_TIMEOUT", "30s".into()),
        ],
        ..Default::default()
    })
    .await;
    // 2,000 distinct ids, 200 at a time, from clients that leave at once.
    let run = unique("flood");
    for batch in 0..10 {
        let sends = (0..200).map(|i| {
            let path = format!("/connections/{run}_{batch}_{i}");
            let sc = &sc;
            async move { ask_and_leave(sc, &path).await }
        });
        join_all(sends).await;
    }
    // Every slot is held by an abandoned lookup: a new id is refused at once.
    let r = sc.get(&format!("/connections/{run}_late")).await;
    let msg = r.expect_error(429, "too_busy");
    assert!(msg.contains("max_in_flight"), "{msg}");
    assert_eq!(
        reqwest::get(format!("{}/livez", sc.admin_url))
            .await
            .unwrap()
            .status(),
        200
    );
    // AWS saw at most 8 resolutions' calls: each hangs on its first
    // attempt until aws_timeout ends the whole call (retries included).
    let calls = faults.calls("*");
    assert!(
        (8..=8 * 3).contains(&calls),
        "{calls} AWS calls for 2,000 ids"
    );
    let metrics = sc.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("outcome=\"too_busy\"") && !l.ends_with(" 0")),
        "the refusal is counted"
    );
    // AWS back: once the hung calls end, lookups work again.
    faults.clear();
    let db = airflow_json_db().await;
    let ok = eventually(Duration::from_secs(75), || async {
        sc.get(&format!("/connections/{}", db.conn_id)).await.status == 200
    })
    .await;
    assert!(ok, "lookups did not recover after AWS came back");
    assert!(faults.calls("*") <= 8 * 3 + 20, "{}", faults.calls("*"));
}

/// Run futures at once, their outputs in order (no extra dependency).
async fn join_all<T, F: std::future::Future<Output = T>>(fs: impl Iterator<Item = F>) -> Vec<T> {
    let mut pending: Vec<_> = fs.map(|f| Some(Box::pin(f))).collect();
    let mut out: Vec<Option<T>> = pending.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut left = false;
        for (slot, f) in out.iter_mut().zip(pending.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *slot = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => left = true,
                }
            }
        }
        if left {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

#[tokio::test]
async fn refresh_true_values_are_expensive_requests() {
    let faults = AwsFaults::start().await;
    faults.on("*", Fault::Hang);
    let sc = Sidecar::start(Options {
        aws_url: Some(faults.url.clone()),
        env: vec![
            ("SIDECAR_MAX_CONCURRENT_CHECKS", "4".into()),
            ("SIDECAR_REQUEST_TIMEOUT", "3s".into()),
        ],
        ..Default::default()
    })
    .await;
    let run = unique("var");
    let asks = (0..20).map(|i| {
        let sc = &sc;
        let path = format!("/variables/{run}_{i}?refresh=true");
        async move { sc.get(&path).await.status }
    });
    let statuses: Vec<u16> = join_all(asks).await;
    let busy = statuses.iter().filter(|s| **s == 429).count();
    assert!(busy >= 16, "{statuses:?}");
    let calls = faults.calls("*");
    assert!(
        calls <= 4 * 3,
        "{calls} AWS calls for 20 refresh=true variables"
    );
}

#[tokio::test]
async fn config_serves_only_the_listed_options() {
    let (listed, other) = (unique("fernet_key"), unique("sql_alchemy_conn"));
    for key in [&listed, &other] {
        put_secret(&format!("airflow/config/{key}"), "Config-Value-Marker").await;
    }
    // Off by default: refused before any AWS call.
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid("Config-Value-Marker");
    let r = sc.get(&format!("/config/{listed}")).await;
    let msg = r.expect_error(403, "config_disabled");
    assert!(
        msg.contains(&listed) && msg.contains("SIDECAR_CONFIG_KEYS"),
        "{msg}"
    );
    // Listed: served; anything else: refused, naming the setting.
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_CONFIG_KEYS", format!("{listed}, unrelated"))],
        ..Default::default()
    })
    .await;
    sc.forbid("Config-Value-Marker");
    let r = sc.get(&format!("/config/{listed}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["value"], "Config-Value-Marker");
    let msg = sc
        .get(&format!("/config/{other}"))
        .await
        .expect_error(403, "config_disabled")
        .to_string();
    assert!(msg.contains("not in config_keys"), "{msg}");
    assert_eq!(
        aws_calls("GetSecretValue", &format!("airflow/config/{other}")).await,
        0
    );
}
