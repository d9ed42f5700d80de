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
