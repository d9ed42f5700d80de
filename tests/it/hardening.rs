//! Issue 19, "safe by default": each of its smaller items through the real
//! HTTP API, with the test that would have caught it.

use std::time::Duration;

use crate::support::{airflow_json_db, unique, Options, Sidecar};

const GET: reqwest::Method = reqwest::Method::GET;

/// Past the token's once-a-second re-check on the hot path.
const PAST_RECHECK: Duration = Duration::from_millis(1300);

// ---- 1. token file deleted, emptied or unreadable ---------------------------

#[tokio::test]
async fn a_deleted_or_emptied_token_file_accepts_no_token() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    let path = format!("/connections/{}", db.conn_id);
    let with = |t: &str| {
        let (sc, path, t) = (&sc, &path, t.to_string());
        async move { sc.request(GET, path, Some(&t), &[]).await }
    };
    let (first, second) = (unique("first-token"), unique("second-token"));
    for t in [&sc.token, &first, &second] {
        sc.forbid(t);
    }
    // Cached, so the hot path (a thread's copy) answers from here on.
    for _ in 0..4 {
        assert_eq!(sc.get(&path).await.status, 200);
    }

    std::fs::remove_file(&sc.token_file).unwrap();
    tokio::time::sleep(PAST_RECHECK).await;
    for _ in 0..3 {
        with(&sc.token).await.expect_error(401, "unauthorized");
    }
    let logs = sc.logs();
    let path_shown = sc.token_file.display().to_string();
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains("no token is accepted")
            && l.contains(&path_shown)),
        "a warning naming the token file"
    );

    // A new token works at once; the old one never comes back.
    std::fs::write(&sc.token_file, format!("{first}\n")).unwrap();
    assert_eq!(with(&first).await.status, 200);
    with(&sc.token).await.expect_error(401, "unauthorized");

    // Emptied (as a truncating writer leaves it): nothing is accepted.
    std::fs::write(&sc.token_file, "").unwrap();
    tokio::time::sleep(PAST_RECHECK).await;
    with(&first).await.expect_error(401, "unauthorized");
    with("").await.expect_error(401, "unauthorized");
    sc.request(GET, &path, None, &[])
        .await
        .expect_error(401, "unauthorized");

    // Unreadable (a directory where the file was): the same.
    std::fs::write(&sc.token_file, format!("{second}\n")).unwrap();
    assert_eq!(with(&second).await.status, 200);
    std::fs::remove_file(&sc.token_file).unwrap();
    std::fs::create_dir(&sc.token_file).unwrap();
    tokio::time::sleep(PAST_RECHECK).await;
    with(&second).await.expect_error(401, "unauthorized");
    std::fs::remove_dir(&sc.token_file).unwrap();
    std::fs::write(&sc.token_file, format!("{second}\n")).unwrap();
    assert_eq!(with(&second).await.status, 200);
}

// ---- 2. every forwarding header ---------------------------------------------

#[tokio::test]
async fn every_forwarding_header_is_refused() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    let path = format!("/connections/{}", db.conn_id);
    for _ in 0..4 {
        assert_eq!(sc.get(&path).await.status, 200);
    }
    for (name, value) in [
        ("X-Forwarded-For", "10.0.0.1"),
        ("Forwarded", "for=10.0.0.1;proto=https"),
        ("X-Real-IP", "10.0.0.1"),
        ("Via", "1.1 proxy.example"),
        ("X-Forwarded-Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Prefix", "/sidecar"),
    ] {
        let r = sc
            .request(GET, &path, Some(&sc.token), &[(name, value)])
            .await;
        let msg = r.expect_error(403, "forwarded_refused");
        assert!(
            msg.contains(&name.to_ascii_lowercase()),
            "{name}: the message names the header: {msg}"
        );
        // Refused before the token is even looked at.
        sc.request(GET, &path, None, &[(name, value)])
            .await
            .expect_error(403, "forwarded_refused");
    }
    // Headers that merely look alike are not forwarding headers.
    let r = sc
        .request(GET, &path, Some(&sc.token), &[("X-Forwarded", "no")])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
}
