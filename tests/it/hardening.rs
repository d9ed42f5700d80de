//! Issue 19, "safe by default": each of its smaller items through the real
//! HTTP API, with the test that would have caught it.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::faults::{AwsFaults, Fault};
use crate::support::{
    airflow_json_db, env, password, put_secret, put_version, sm, unique, Options, Sidecar,
};

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
    // Cached, so the hot path answers from here on.
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

// ---- 3. DNS rebinding: without a token, only a loopback Host ---------------

/// One HTTP/1.1 request on a fresh connection, written as is; the answer's
/// status line and body.
async fn raw(sc: &Sidecar, head: &str) -> (u16, serde_json::Value) {
    let addr = sc.url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .expect("the sidecar answers and closes")
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[tokio::test]
async fn without_a_token_only_a_loopback_host_is_served() {
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_INSECURE_NO_TOKEN", "true".into())],
        ..Default::default()
    })
    .await;
    let port = sc.url.rsplit(':').next().unwrap().to_string();
    let missing = unique("missing");
    let get = |host: Option<String>| {
        let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
        format!("GET /connections/{missing} HTTP/1.1\r\n{host}Connection: close\r\n\r\n")
    };
    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        format!("10.0.0.1:{port}"),
        format!("0.0.0.0:{port}"),
    ] {
        let (status, body) = raw(&sc, &get(Some(host.clone()))).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("host_refused")),
            "{host}: {body}"
        );
        let msg = body["message"].as_str().unwrap();
        assert!(msg.contains(&host) && msg.contains("not loopback"), "{msg}");
    }
    // No Host at all (HTTP/1.0 allows that; HTTP/1.1 does not).
    let (status, body) = raw(&sc, &format!("GET /connections/{missing} HTTP/1.0\r\n\r\n")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("host_refused")),
        "{body}"
    );
    // An absolute-form target naming another host, with a loopback Host.
    let (status, body) = raw(
        &sc,
        &format!(
            "GET http://evil.example:{port}/connections/{missing} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("host_refused")),
        "{body}"
    );

    // Loopback names are served: a missing id is a plain 404.
    for host in [
        format!("localhost:{port}"),
        format!("LOCALHOST:{port}"),
        "localhost".to_string(),
        format!("127.0.0.1:{port}"),
        format!("127.1.2.3:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (status, body) = raw(&sc, &get(Some(host.clone()))).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("not_found")),
            "{host}: {body}"
        );
    }
    // A client that connects by address (reqwest sends Host: 127.0.0.1:PORT).
    let r = sc
        .request(GET, &format!("/connections/{missing}"), None, &[])
        .await;
    r.expect_error(404, "not_found");
}

#[tokio::test]
async fn with_a_token_the_host_is_not_checked() {
    let sc = Sidecar::start(Options::default()).await;
    let missing = unique("missing");
    let (status, body) = raw(
        &sc,
        &format!(
            "GET /connections/{missing} HTTP/1.1\r\nHost: evil.example\r\nX-Sidecar-Token: {}\r\nConnection: close\r\n\r\n",
            sc.token
        ),
    )
    .await;
    assert_eq!(
        (status, body["error"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
}

// ---- 4. team names that make <team>--<id> ambiguous -------------------------

#[tokio::test]
async fn ambiguous_team_lookups_are_400_naming_why() {
    // One secret name, two readings: team "t" + id "-x", or team "t-" + id "x".
    let (team, id, key) = ("t", unique("x"), unique("k"));
    put_secret(
        &format!("airflow/connections/{team}---{id}"),
        &json!({"conn_type": "http", "host": "h"}).to_string(),
    )
    .await;
    put_secret(&format!("airflow/variables/{team}---{key}"), "v").await;
    let sc = Sidecar::start(Options::default()).await;
    for kind in ["connections", "variables"] {
        let name = if kind == "connections" { &id } else { &key };
        let msg = sc
            .get(&format!("/{kind}/{name}?team={team}-"))
            .await
            .expect_error(400, "bad_request")
            .to_string();
        assert!(
            msg.contains("ends with \"-\"") && msg.contains("ambiguous"),
            "{msg}"
        );
        let msg = sc
            .get(&format!("/{kind}/{name}?team=-{team}"))
            .await
            .expect_error(400, "bad_request")
            .to_string();
        assert!(msg.contains("starts or ends with \"-\""), "{msg}");
        let msg = sc
            .get(&format!("/{kind}/-{name}?team={team}"))
            .await
            .expect_error(400, "invalid_conn_id")
            .to_string();
        assert!(
            msg.contains("starts with \"-\"") && msg.contains("ambiguous"),
            "{msg}"
        );
    }
    // The rotation check takes the same key.
    sc.post(&format!("/connections/-{id}/rotation-check?team={team}"))
        .await
        .expect_error(400, "invalid_conn_id");
    // Without a team an id may start with "-" (the name is <prefix>/<id>).
    sc.get(&format!("/connections/-{id}"))
        .await
        .expect_error(404, "not_found");
}

#[tokio::test]
async fn a_pinned_team_ending_in_a_dash_is_a_start_up_error() {
    let (code, _, err) =
        crate::support::cli(&["check-config"], &[("SIDECAR_TEAM", "data-".into())]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("\"data-\"") && err.contains("ambiguous"),
        "{err}"
    );
}

// ---- 5. dates out of range never panic ---------------------------------------

#[tokio::test]
async fn dates_out_of_range_from_aws_are_reported_never_a_panic() {
    let db = airflow_json_db().await;
    let pending_value = json!({
        "conn_type": "postgres", "host": "localhost", "port": env().pg_port,
        "login": db.role, "password": db.password, "schema": db.role,
    })
    .to_string();
    let pending = put_version(&db.secret_id, &pending_value, &["AWSPENDING"]).await;
    let meta = sm()
        .await
        .describe_secret()
        .secret_id(&db.secret_id)
        .send()
        .await
        .unwrap();
    let arn = meta.arn().unwrap().to_string();
    let faults = AwsFaults::start().await;
    let sc = Sidecar::start(Options {
        aws_url: Some(faults.url.clone()),
        ..Default::default()
    })
    .await;
    sc.forbid(&db.password);
    // Year 10000, far beyond, before 1970: every date field DescribeSecret has.
    faults.on_secret(
        "DescribeSecret",
        &db.secret_id,
        None,
        Fault::Answer(
            json!({
                "ARN": arn, "Name": db.secret_id, "RotationEnabled": true,
                "LastRotatedDate": 253402300800i64,
                "NextRotationDate": 1e300,
                "LastChangedDate": 9.2e18,
                "LastAccessedDate": -1e12,
                "CreatedDate": -9.2e18,
                "VersionIdsToStages": meta.version_ids_to_stages().unwrap(),
            })
            .to_string(),
        ),
    );
    // And a version whose CreatedDate is out of range.
    faults.on_secret(
        "GetSecretValue",
        &db.secret_id,
        Some("AWSPENDING"),
        Fault::Answer(
            json!({
                "ARN": arn, "Name": db.secret_id, "VersionId": pending,
                "SecretString": pending_value, "VersionStages": ["AWSPENDING"],
                "CreatedDate": 1e30,
            })
            .to_string(),
        ),
    );

    let r = sc
        .post(&format!("/connections/{}/rotation-check", db.conn_id))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(faults.calls_for("DescribeSecret", &db.secret_id, None) >= 1);
    let report = &r.json;
    assert_eq!(report["last_rotated"], serde_json::Value::Null, "{report}");
    assert_eq!(report["next_rotation"], serde_json::Value::Null, "{report}");
    let pending_stage = report["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "AWSPENDING")
        .unwrap_or_else(|| panic!("{report}"));
    assert_eq!(
        pending_stage["created"],
        serde_json::Value::Null,
        "{report}"
    );
    assert_eq!(pending_stage["login"], "ok", "{report}");
    let notes: Vec<&str> = report["notes"]
        .as_array()
        .unwrap_or_else(|| panic!("{report}"))
        .iter()
        .filter_map(|n| n.as_str())
        .collect();
    for field in ["last_rotated", "next_rotation", "AWSPENDING created"] {
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with(field) && n.contains("outside")),
            "{field}: {notes:?}"
        );
    }
    // An unknown creation date is no proof of a stuck rotation.
    assert_eq!(report["verdict"], "rotation_in_progress", "{report}");

    // Alive, and still serving.
    let live = reqwest::get(format!("{}/livez", sc.admin_url))
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let r = sc.get(&format!("/connections/{}", db.conn_id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!sc.logs().contains("panicked"), "a task panicked");
}

// ---- 6. no secret-derived text in error messages or logs ---------------------

#[tokio::test]
async fn values_from_a_secret_never_reach_an_error_message_or_the_log() {
    let marker = unique("marker");
    let pw = password();
    let secret = |fields: serde_json::Value| {
        let mut v =
            json!({"login": "u", "password": pw, "host": "localhost", "port": env().pg_port});
        v.as_object_mut()
            .unwrap()
            .extend(fields.as_object().unwrap().clone());
        v.to_string()
    };
    // A Postgres secret whose engine is something else: malformed.
    let engine = unique("engine");
    put_secret(
        &format!("airflow/connections/{engine}"),
        &secret(json!({"conn_type": "postgres", "engine": marker})),
    )
    .await;
    // A conn_type no one knows: refused (unvalidated = refuse) naming no type.
    let typed = unique("typed");
    put_secret(
        &format!("airflow/connections/{typed}"),
        &secret(json!({"conn_type": marker})),
    )
    .await;
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_UNVALIDATED", "refuse".into())],
        ..Default::default()
    })
    .await;
    sc.forbid(&marker);
    sc.forbid(&pw);
    let r = sc.get(&format!("/connections/{engine}")).await;
    let msg = r.expect_error(502, "secret_malformed");
    assert!(msg.contains("engine is not Postgres"), "{msg}");
    assert!(!r.text.contains(&marker), "{}", r.text);
    let r = sc.get(&format!("/connections/{typed}")).await;
    let msg = r.expect_error(403, "unvalidated_refused");
    assert!(
        msg.contains(&typed) && msg.contains("(not quoted)"),
        "{msg}"
    );
    assert!(!r.text.contains(&marker), "{}", r.text);
    let r = sc
        .post(&format!("/connections/{typed}/rotation-check"))
        .await;
    assert!(r.status >= 400 && !r.text.contains(&marker), "{}", r.text);
    assert!(!sc.logs().contains(&marker));
}

#[tokio::test]
async fn a_rotation_report_quotes_no_value_from_a_secret() {
    let marker = unique("marker");
    let db = airflow_json_db().await;
    // AWSPENDING's engine is not Postgres: that stage is malformed.
    put_version(
        &db.secret_id,
        &json!({"engine": marker, "username": db.role, "password": db.password, "host": "localhost"})
            .to_string(),
        &["AWSPENDING"],
    )
    .await;
    // A connection of a type no one knows: served unvalidated, reported so.
    let typed = unique("typed");
    put_secret(
        &format!("airflow/connections/{typed}"),
        &json!({"conn_type": marker, "host": "h", "password": db.password}).to_string(),
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&marker);
    sc.forbid(&db.password);
    let r = sc
        .post(&format!("/connections/{}/rotation-check", db.conn_id))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(!r.text.contains(&marker), "{}", r.text);
    let pending = r.json["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["stage"] == "AWSPENDING")
        .unwrap_or_else(|| panic!("{}", r.text));
    assert_eq!(pending["login"], "malformed", "{}", r.text);
    assert!(
        pending["error"]
            .as_str()
            .unwrap()
            .contains("engine is not Postgres"),
        "{}",
        r.text
    );
    let r = sc
        .post(&format!("/connections/{typed}/rotation-check"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["verdict"], "not_validated", "{}", r.text);
    assert!(
        r.json["message"].as_str().unwrap().contains("(not quoted)"),
        "{}",
        r.text
    );
    assert!(!r.text.contains(&marker), "{}", r.text);
    let r = sc.get(&format!("/connections/{typed}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The answer itself carries the secret's fields, as Airflow's backend would.
    assert!(r.text.contains(&marker));
    assert!(!sc.logs().contains(&marker));
}
