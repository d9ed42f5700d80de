//! Every connection type Airflow keeps in Secrets Manager, teams and config
//! options, through the real HTTP API. (Field-by-field parity with Airflow's
//! own backend is tested inside real Airflow, in deploy/airflow/tests.)

use crate::support::*;
use serde_json::json;

#[tokio::test]
async fn other_types_are_served_unvalidated_and_say_so() {
    let pw = password();
    let http_id = unique("http");
    put_secret(
        &format!("airflow/connections/{http_id}"),
        &json!({"conn_type": "http", "host": "api.example.com", "login": "bot", "password": pw, "extra": {"timeout": 5}})
            .to_string(),
    )
    .await;
    let slack_id = unique("slack");
    let slack_pw = password();
    put_secret(
        &format!("airflow/connections/{slack_id}"),
        &format!("slackwebhook://:{slack_pw}@hooks.slack.com/services"),
    )
    .await;
    let redshift_id = unique("redshift");
    put_secret(
        &format!("airflow/connections/{redshift_id}"),
        &json!({"engine": "redshift", "host": "cluster.example", "username": "u", "password": pw, "port": 5439})
            .to_string(),
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&pw);
    sc.forbid(&slack_pw);

    let r = sc.get(&format!("/connections/{http_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-validated"), Some("false"));
    assert_eq!(
        r.header("x-sidecar-secret"),
        Some(format!("airflow/connections/{http_id}").as_str())
    );
    let obj = r.json.as_object().unwrap();
    assert!(
        obj.keys().all(|k| AIRFLOW_KEYS.contains(&k.as_str())),
        "{obj:?}"
    );
    assert_eq!(r.json["conn_type"], "http");
    assert_eq!(r.json["password"], pw.as_str());

    let r = sc.get(&format!("/connections/{slack_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-validated"), Some("false"));
    assert!(
        r.json["uri"]
            .as_str()
            .unwrap()
            .starts_with("slackwebhook://"),
        "{}",
        r.text
    );

    // Redshift speaks Postgres' protocol, but Airflow connects its own way.
    let r = sc.get(&format!("/connections/{redshift_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-sidecar-validated"), Some("false"));

    // A Postgres one next to them is proven.
    let db = airflow_json_db().await;
    sc.forbid(&db.password);
    let r = sc.get(&format!("/connections/{}", db.conn_id)).await;
    assert_eq!(r.header("x-sidecar-validated"), Some("true"), "{}", r.text);

    // Cached like any answer: a second lookup asks AWS nothing.
    let before = aws_calls("GetSecretValue", &format!("airflow/connections/{http_id}")).await;
    sc.get(&format!("/connections/{http_id}")).await;
    assert_eq!(
        aws_calls("GetSecretValue", &format!("airflow/connections/{http_id}")).await,
        before
    );

    // The metric and the rotation check say it was not validated.
    let m = sc.metrics().await;
    assert!(
        m.contains(r#"sidecar_lookups_total{kind="connection",outcome="ok",validated="false"}"#),
        "{m}"
    );
    let r = sc
        .post(&format!("/connections/{http_id}/rotation-check"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["verdict"], "not_validated");
    assert_eq!(r.json["stages"][0]["login"], "not_tried");
    assert!(sc.logs().contains(r#""validated":"false""#));
}

#[tokio::test]
async fn unvalidated_refuse_names_the_conn_type() {
    let id = unique("aws");
    let pw = password();
    put_secret(
        &format!("airflow/connections/{id}"),
        &json!({"conn_type": "aws", "login": "AKIA", "password": pw, "extra": {"role_arn": "arn:aws:iam::1:role/x"}})
            .to_string(),
    )
    .await;
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_UNVALIDATED", "refuse".into())],
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    let msg = sc
        .get(&format!("/connections/{id}"))
        .await
        .expect_error(403, "unvalidated_refused")
        .to_string();
    assert!(msg.contains("conn_type aws") && msg.contains(&id), "{msg}");
    // Postgres is still served.
    let db = airflow_json_db().await;
    let r = sc.get(&format!("/connections/{}", db.conn_id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

#[tokio::test]
async fn teams_see_their_own_secret_then_the_shared_one_never_another_teams() {
    let id = unique("teamconn");
    let (blue_pw, shared_pw) = (password(), password());
    let http = |pw: &str, host: &str| {
        json!({"conn_type": "http", "host": host, "login": "u", "password": pw}).to_string()
    };
    put_secret(
        &format!("airflow/connections/blue--{id}"),
        &http(&blue_pw, "blue.example"),
    )
    .await;
    put_secret(
        &format!("airflow/connections/{id}"),
        &http(&shared_pw, "shared.example"),
    )
    .await;
    let var = unique("teamvar");
    put_secret(&format!("airflow/variables/blue--{var}"), "blue-value").await;
    put_secret(&format!("airflow/variables/{var}"), "shared-value").await;

    let sc = Sidecar::start(Options::default()).await;
    sc.forbid(&blue_pw);
    sc.forbid(&shared_pw);
    let r = sc.get(&format!("/connections/{id}?team=blue")).await;
    assert_eq!(r.json["host"], "blue.example", "{}", r.text);
    assert_eq!(
        r.header("x-sidecar-secret"),
        Some(format!("airflow/connections/blue--{id}").as_str())
    );
    let r = sc.get(&format!("/connections/{id}?team=green")).await;
    assert_eq!(r.json["host"], "shared.example", "{}", r.text);
    assert_eq!(
        r.header("x-sidecar-secret"),
        Some(format!("airflow/connections/{id}").as_str())
    );
    let r = sc.get(&format!("/connections/{id}")).await;
    assert_eq!(r.json["host"], "shared.example");
    // Cached per team: blue's answer is still blue's after green's lookup.
    let r = sc.get(&format!("/connections/{id}?team=blue")).await;
    assert_eq!(r.json["host"], "blue.example");
    // Variables follow the same order.
    let r = sc.get(&format!("/variables/{var}?team=blue")).await;
    assert_eq!(r.json["value"], "blue-value", "{}", r.text);
    let r = sc.get(&format!("/variables/{var}?team=green")).await;
    assert_eq!(r.json["value"], "shared-value");
    // Ids holding the separator are refused in team lookups, bad team names too.
    sc.get(&format!("/connections/blue--{id}?team=green"))
        .await
        .expect_error(400, "invalid_conn_id");
    sc.get(&format!("/connections/{id}?team=a--b"))
        .await
        .expect_error(400, "bad_request");

    // A sidecar pinned to blue serves blue (also when no team is named), refuses green.
    let pinned = Sidecar::start(Options {
        env: vec![("SIDECAR_TEAM", "blue".into())],
        ..Default::default()
    })
    .await;
    pinned.forbid(&blue_pw);
    pinned.forbid(&shared_pw);
    let r = pinned.get(&format!("/connections/{id}")).await;
    assert_eq!(r.json["host"], "blue.example", "{}", r.text);
    let msg = pinned
        .get(&format!("/connections/{id}?team=green"))
        .await
        .expect_error(403, "team_forbidden")
        .to_string();
    assert!(msg.contains("blue") && msg.contains("green"), "{msg}");
    pinned
        .get(&format!("/variables/{var}?team=green"))
        .await
        .expect_error(403, "team_forbidden");
    pinned
        .get("/config/anything?team=green")
        .await
        .expect_error(403, "team_forbidden");
}

#[tokio::test]
async fn config_values_are_served_as_stored_and_database_uris_proven_first() {
    let key = unique("fernet_key");
    put_secret(&format!("airflow/config/{key}"), "a-fernet-key=").await;
    let db = airflow_json_db().await;
    let port = env().pg_port;
    let good_key = unique("sql_alchemy_conn");
    let good = format!(
        "postgresql+psycopg2://{}:{}@localhost:{port}/{}?sslmode=verify-full",
        db.role, db.password, db.role
    );
    put_secret(&format!("airflow/config/{good_key}"), &good).await;
    let bad_key = unique("sql_alchemy_conn");
    let bad_pw = password();
    put_secret(
        &format!("airflow/config/{bad_key}"),
        &format!(
            "postgresql://{}:{bad_pw}@localhost:{port}/{}?sslmode=verify-full",
            db.role, db.role
        ),
    )
    .await;
    // No sslmode: libpq's default (prefer) is below the default min_sslmode.
    let weak_key = unique("sql_alchemy_conn");
    put_secret(
        &format!("airflow/config/{weak_key}"),
        &format!(
            "postgresql://{}:{}@localhost:{port}/{}",
            db.role, db.password, db.role
        ),
    )
    .await;
    let missing = unique("missing");
    let keys = [&key, &good_key, &bad_key, &weak_key, &missing].map(|k| k.as_str());
    let sc = Sidecar::start(Options {
        env: vec![("SIDECAR_CONFIG_KEYS", keys.join(","))],
        ..Default::default()
    })
    .await;
    sc.forbid(&db.password);
    sc.forbid(&bad_pw);
    sc.forbid("a-fernet-key=");

    let r = sc.get(&format!("/config/{key}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["value"], "a-fernet-key=");
    let logins = logins_of(&db.role);
    let r = sc.get(&format!("/config/{good_key}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["value"], good.as_str(), "served exactly as stored");
    assert!(
        logins_of(&db.role) > logins,
        "the URI was proven before it was served"
    );
    let msg = sc
        .get(&format!("/config/{bad_key}"))
        .await
        .expect_error(503, "credentials_rejected")
        .to_string();
    assert!(msg.contains(&bad_key), "{msg}");
    let msg = sc
        .get(&format!("/config/{weak_key}"))
        .await
        .expect_error(502, "secret_malformed")
        .to_string();
    assert!(
        msg.contains("min_sslmode") && msg.contains("prefer"),
        "{msg}"
    );
    sc.get(&format!("/config/{missing}"))
        .await
        .expect_error(404, "not_found");
}
