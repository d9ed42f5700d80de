//! The credential API: secret shapes, answers, errors, token rules, the CLI.

use crate::support::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn airflow_json_secret_is_served_with_only_airflow_keys() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&db.password);
    let r = sc.get(&format!("/connections/{}", db.conn_id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let obj = r.json.as_object().unwrap();
    assert!(
        obj.keys().all(|k| AIRFLOW_KEYS.contains(&k.as_str())),
        "{obj:?}"
    );
    assert_eq!(r.json["conn_type"], "postgres");
    assert_eq!(r.json["host"], "localhost");
    assert_eq!(r.json["port"], env().pg_port);
    assert_eq!(r.json["login"], db.role.as_str());
    assert_eq!(r.json["password"], db.password.as_str());
    assert_eq!(r.json["schema"], db.role.as_str());
    assert_eq!(r.json["extra"]["sslmode"], "verify-full");
    assert_eq!(
        r.json["extra"]["sslrootcert"],
        env().ca_file.display().to_string()
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("x-sidecar-stage"), Some("AWSCURRENT"));
    assert!(r.header("x-sidecar-age").unwrap().parse::<u64>().is_ok());
}

/// Each accepted secret shape, normalised to the same answer.
#[tokio::test]
async fn every_secret_shape_is_accepted() {
    let role = unique("shapes");
    // Characters that need percent-encoding in a URI.
    let pw = format!("{}@:/?#%", password());
    create_role(&role, &pw).await;
    let port = env().pg_port;
    let uri_pw: String = url::form_urlencoded::byte_serialize(pw.as_bytes()).collect();
    let shapes = [
        ("rds_template", json!({"engine": "postgres", "host": "localhost", "port": port,
            "username": role, "password": pw, "dbname": role}).to_string()),
        ("aliases_user_pass", json!({"user": role, "pass": pw, "remote_host": "localhost",
            "port": port.to_string(), "database": role}).to_string()),
        ("aliases_user_name_key", json!({"user_name": role, "key": pw, "server": "localhost",
            "port": port, "schema": role, "extra": "{\"application_name\": \"x\", \"cursor\": \"dict\"}"}).to_string()),
        ("uri", format!("postgresql://{role}:{uri_pw}@localhost:{port}/{role}")),
        ("uri_short_scheme", format!("postgres://{role}:{uri_pw}@localhost:{port}/{role}?sslmode=verify-full")),
    ];
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&pw);
    for (shape, value) in &shapes {
        let conn_id = unique(shape);
        put_secret(&format!("airflow/connections/{conn_id}"), value).await;
        let r = sc.get(&format!("/connections/{conn_id}")).await;
        assert_eq!(r.status, 200, "{shape}: {}", r.text);
        assert_eq!(r.json["login"], role.as_str(), "{shape}");
        assert_eq!(r.json["password"], pw.as_str(), "{shape}");
        assert_eq!(r.json["host"], "localhost", "{shape}");
        assert_eq!(r.json["port"], port, "{shape}");
        assert_eq!(r.json["schema"], role.as_str(), "{shape}");
        let extra = r.json["extra"].as_object().unwrap();
        assert!(
            extra
                .keys()
                .all(|k| ["sslmode", "sslrootcert", "application_name", "cursor"]
                    .contains(&k.as_str())),
            "{shape}: only libpq options (and the hook's own keys) in extra: {extra:?}"
        );
    }
}

#[tokio::test]
async fn missing_secret_is_404_not_found() {
    let sc = Sidecar::start(Options::default()).await;
    let conn_id = unique("absent");
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    let msg = r.expect_error(404, "not_found");
    assert!(
        msg.contains(&format!("airflow/connections/{conn_id}")),
        "{msg}"
    );
}

#[tokio::test]
async fn connections_prefix_setting_is_used() {
    let db = airflow_json_db().await;
    let conn_id = unique("prefixed");
    let value = sm()
        .await
        .get_secret_value()
        .secret_id(&db.secret_id)
        .send()
        .await
        .unwrap()
        .secret_string
        .unwrap();
    put_secret(&format!("team-a/conns/{conn_id}"), &value).await;
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_CONNECTIONS_PREFIX", "team-a/conns".into())],
        ..Default::default()
    })
    .await;
    assert_eq!(sc.get(&format!("/connections/{conn_id}")).await.status, 200);
    // The default prefix is no longer consulted.
    sc.get(&format!("/connections/{}", db.conn_id))
        .await
        .expect_error(404, "not_found");
}

/// Invalid ids are refused before any AWS call: with AWS unreachable the
/// answer is still 400, not 502.
#[tokio::test]
async fn invalid_conn_ids_are_400_without_an_aws_call() {
    let sc = Sidecar::start(Options {
        aws_down: true,
        ..Default::default()
    })
    .await;
    let long = "a".repeat(251);
    for bad in [
        "bad%2Fid",
        "sp%20ace",
        "semi;colon",
        "%C3%BCml",
        long.as_str(),
        "%FF",
    ] {
        let r = sc.get(&format!("/connections/{bad}")).await;
        let msg = r.expect_error(400, "invalid_conn_id");
        assert!(msg.contains("A-Z a-z 0-9 _ . -"), "{msg}");
    }
    let ok_len = "a".repeat(250);
    // A valid id does reach AWS (and AWS is down here).
    sc.get(&format!("/connections/{ok_len}"))
        .await
        .expect_error(502, "upstream_error");
    assert!(!sc
        .metrics()
        .await
        .contains("api=\"GetSecretValue\",outcome=\"ok\""));
}

#[tokio::test]
async fn token_is_required_and_compared_exactly() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    let path = format!("/connections/{}", db.conn_id);
    let get = reqwest::Method::GET;
    sc.request(get.clone(), &path, None, &[])
        .await
        .expect_error(401, "unauthorized");
    sc.request(get.clone(), &path, Some("wrong"), &[])
        .await
        .expect_error(401, "unauthorized");
    let prefix = &sc.token[..sc.token.len() - 1];
    sc.request(get.clone(), &path, Some(prefix), &[])
        .await
        .expect_error(401, "unauthorized");
    assert_eq!(
        sc.request(get.clone(), &path, Some(&sc.token), &[])
            .await
            .status,
        200
    );

    // The token file is re-read when it changes: the new token works at
    // once, the old one stops within a second.
    std::fs::write(&sc.token_file, "rotated-token\n").unwrap();
    let with = |t: &'static str| sc.request(get.clone(), &path, Some(t), &[]);
    assert_eq!(with("rotated-token").await.status, 200);
    sc.request(get.clone(), &path, Some(&sc.token), &[])
        .await
        .expect_error(401, "unauthorized");
    std::fs::write(&sc.token_file, "rotated-again\n").unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    with("rotated-token")
        .await
        .expect_error(401, "unauthorized");
    assert_eq!(with("rotated-again").await.status, 200);
}

#[tokio::test]
async fn forwarded_requests_are_refused() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    let path = format!("/connections/{}", db.conn_id);
    let forwarded = || {
        sc.request(
            reqwest::Method::GET,
            &path,
            Some(&sc.token),
            &[("X-Forwarded-For", "10.0.0.1")],
        )
    };
    forwarded().await.expect_error(403, "forwarded_refused");
    // Cached, so the hot path answers from here on:
    // the refusal still comes first.
    for _ in 0..4 {
        assert_eq!(sc.get(&path).await.status, 200);
    }
    forwarded().await.expect_error(403, "forwarded_refused");
}

#[tokio::test]
async fn malformed_secrets_are_502_naming_the_secret_never_its_text() {
    let sc = Sidecar::start(Options::default()).await;
    let pw = password();
    sc.forbid(&pw);
    let cases = [
        (
            format!("not json, not a uri, but a password {pw}"),
            "neither a JSON object",
        ),
        (
            json!({"login": "someone", "port": 5432, "host": "h"}).to_string(),
            "no password",
        ),
        (json!({"password": pw, "host": "h"}).to_string(), "no login"),
        (
            format!("{{\"login\": \"u\", \"password\": \"{pw}\""),
            "not valid JSON",
        ),
        (
            json!({"login": "u", "password": pw, "port": pw}).to_string(),
            "port",
        ),
        (json!({"login": "u", "password": pw}).to_string(), "no host"),
        (
            json!({"conn_type": "postgres", "login": "u", "password": pw, "host": "h", "extra": {"sslcrl": "/crl.pem"}}).to_string(),
            "sslcrl",
        ),
    ];
    for (value, want) in &cases {
        let conn_id = unique("malformed");
        let secret_id = format!("airflow/connections/{conn_id}");
        put_secret(&secret_id, value).await;
        let r = sc.get(&format!("/connections/{conn_id}")).await;
        let msg = r.expect_error(502, "secret_malformed");
        assert!(msg.contains(&secret_id), "{msg}");
        assert!(msg.contains(want), "{msg} should say {want}");
        assert!(!r.text.contains(&pw), "leaked: {}", r.text);
    }
}

#[tokio::test]
async fn aws_failure_is_502_upstream_error_naming_the_api() {
    let sc = Sidecar::start(Options {
        aws_down: true,
        env: vec![("SIDECAR_AWS_TIMEOUT", "2s".into())],
        ..Default::default()
    })
    .await;
    let conn_id = unique("nowhere");
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    assert!(r.status == 502 || r.status == 504, "{}", r.text);
    let msg = r.json["message"].as_str().unwrap();
    assert!(msg.contains("GetSecretValue"), "{msg}");
    assert!(
        msg.contains(&format!("airflow/connections/{conn_id}")),
        "{msg}"
    );
}

#[tokio::test]
async fn unknown_routes_methods_and_queries_are_4xx() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options::default()).await;
    sc.get("/").await.expect_error(404, "not_found");
    sc.get("/connections").await.expect_error(404, "not_found");
    sc.get("/connections/a/b/c")
        .await
        .expect_error(404, "not_found");
    sc.post(&format!("/connections/{}", db.conn_id))
        .await
        .expect_error(405, "method_not_allowed");
    sc.get(&format!("/connections/{}?refresh=maybe", db.conn_id))
        .await
        .expect_error(400, "bad_request");
    assert_eq!(
        sc.get(&format!("/connections/{}?refresh=true", db.conn_id))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn oversized_headers_are_refused_without_crashing() {
    let sc = Sidecar::start(Options::default()).await;
    let huge = "x".repeat(64 * 1024);
    let resp = reqwest::Client::new()
        .get(format!("{}/connections/a", sc.url))
        .header("X-Sidecar-Token", &sc.token)
        .header("X-Big", huge)
        .send()
        .await;
    if let Ok(r) = resp {
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    // Still serving.
    sc.get("/connections/x%2Fy")
        .await
        .expect_error(400, "invalid_conn_id");
}

#[tokio::test]
async fn cli_get_prints_json_or_fails_with_the_error() {
    let db = airflow_json_db().await;
    let (code, out, err) = cli(&["get", &db.conn_id], &[]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["login"], db.role.as_str());
    assert!(!err.contains(&db.password), "stderr leaks the password");

    let missing = unique("missing");
    let (code, out, err) = cli(&["get", &missing], &[]);
    assert_ne!(code, 0);
    assert!(out.is_empty());
    assert!(err.contains("not_found") && err.contains(&missing), "{err}");
}

/// `check-config` prints every effective setting and where it came from:
/// a flag over an environment variable over the file over the default.
#[tokio::test]
async fn check_config_shows_each_effective_setting_and_its_source() {
    let dir = env().dir.join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    std::fs::write(
        &file,
        "secret_ttl = \"10m\"\ncache_size = 7\nerror_ttl = \"9s\"\n",
    )
    .unwrap();
    let (code, out, err) = cli(
        &["check-config", "--error-ttl", "3s"],
        &[
            ("SIDECAR_CONFIG", file.display().to_string()),
            ("SIDECAR_CACHE_SIZE", "9".into()),
            ("SIDECAR_MAX_STALE", "2h".into()),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("configuration OK"), "{out}");
    let shown: std::collections::HashMap<String, String> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.trim().split_once(" = "))
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect();
    for (name, line) in [
        ("secret_ttl", "10m  (file)"),
        ("cache_size", "9  (env)"),
        ("max_stale", "2h  (env)"),
        ("error_ttl", "3s  (flag)"),
        ("negative_ttl", "30s  (default)"),
        ("config_keys", "(none)  (default)"),
    ] {
        assert_eq!(
            shown.get(name).map(String::as_str),
            Some(line),
            "{name}: {out}"
        );
    }
    // Every setting is listed (the token file is a path, never the token).
    assert!(shown.len() >= 40, "{out}");
}

#[tokio::test]
async fn bad_configuration_fails_at_start_with_a_clear_message() {
    let dir = env().dir.join(unique("cfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "secret_tll = \"5m\"\n").unwrap();
    let (code, _, err) = cli(
        &["check-config"],
        &[("SIDECAR_CONFIG", file.display().to_string())],
    );
    assert_eq!(code, 2);
    assert!(err.contains("unknown field `secret_tll`"), "{err}");

    let (code, _, err) = cli(
        &["check-config"],
        &[("SIDECAR_SECRET_TTL", "5 parsecs".into())],
    );
    assert_ne!(code, 0);
    assert!(err.contains("not a duration"), "{err}");

    let (code, _, err) = cli(
        &["serve"],
        &[(
            "SIDECAR_TOKEN_FILE",
            dir.join("no-such-token").display().to_string(),
        )],
    );
    assert_eq!(code, 2);
    assert!(err.contains("cannot read token file"), "{err}");

    let (code, _, err) = cli(&["serve"], &[]);
    assert_eq!(code, 2);
    assert!(err.contains("SIDECAR_TOKEN_FILE"), "{err}");

    std::fs::write(
        &file,
        "[connections.a]\ndb_instance = \"x\"\ndb_cluster = \"y\"\n",
    )
    .unwrap();
    let (code, _, err) = cli(
        &["check-config"],
        &[("SIDECAR_CONFIG", file.display().to_string())],
    );
    assert_eq!(code, 2);
    assert!(
        err.contains("[connections.a]") && err.contains("not both"),
        "{err}"
    );
}

#[tokio::test]
async fn sigterm_stops_cleanly() {
    let mut sc = Sidecar::start(Options::default()).await;
    let status = sc.terminate();
    assert!(status.success(), "{status:?}");
    assert!(sc.logs().contains("stopped"));
}

/// SIGTERM with idle keep-alives open (Airflow clients, kubelet probes):
/// they are closed at once, and the sidecar does not wait out its grace
/// period for them.
#[tokio::test]
async fn sigterm_closes_idle_keep_alives_at_once() {
    use tokio::io::AsyncReadExt;
    let mut sc = Sidecar::start(Options::default()).await;
    let addr = sc.url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for path in ["/connections/no_such_conn", "/nowhere"] {
        let (s, head) = sc.raw_get(path).await;
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        idle.push(s);
    }
    // And one that connected and never sent a byte.
    idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = std::time::Instant::now();
    let (status, sc) = tokio::task::spawn_blocking(move || (sc.terminate(), sc))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(3),
        "exited {took:?} after SIGTERM: the drain waited for idle connections"
    );
    assert!(
        !sc.logs().contains("end of the grace period"),
        "{}",
        sc.logs()
    );
    for mut s in idle {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "closed without another answer: {read:?}"
        );
    }
}

#[tokio::test]
async fn at_info_a_cache_hit_is_a_metric_not_a_log_line() {
    let db = airflow_json_db().await;
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_LOG", "info".into())],
        ..Default::default()
    })
    .await;
    sc.forbid(&db.password);
    let path = format!("/connections/{}", db.conn_id);
    for _ in 0..5 {
        assert_eq!(sc.get(&path).await.status, 200);
    }
    sc.get(&format!("/connections/{}", unique("missing")))
        .await
        .expect_error(404, "not_found");
    let lines: Vec<serde_json::Value> = sc
        .logs()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["message"] == "request")
        .collect();
    let for_db: Vec<_> = lines
        .iter()
        .filter(|v| v["id"] == db.conn_id.as_str())
        .collect();
    assert_eq!(for_db.len(), 1, "only the miss is an event: {for_db:?}");
    assert_eq!(for_db[0]["cache_hit"], false);
    assert!(
        lines.iter().any(|v| v["outcome"] == "not_found"),
        "errors are events: {lines:?}"
    );
    let m = sc.metrics().await;
    assert!(
        m.contains(r#"sidecar_cache_requests_total{result="hit"} 4"#),
        "{m}"
    );
}
