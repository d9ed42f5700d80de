//! Endpoints from RDS: instances, Aurora clusters (writer and reader), the
//! secrets RDS manages, and the tags that point from a secret to its database.

use crate::support::*;
use serde_json::json;

const DOMAIN: &str = "aaaaaaaaaa.us-east-1.rds.amazonaws.com";

async fn create_instance(id: &str, db_name: &str, manage_master: Option<&str>) {
    let mut req = rds()
        .await
        .create_db_instance()
        .db_instance_identifier(id)
        .db_instance_class("db.t3.micro")
        .engine("postgres")
        .allocated_storage(20)
        .port(env().pg_port as i32)
        .db_name(db_name);
    req = match manage_master {
        Some(user) => req.master_username(user).manage_master_user_password(true),
        None => req
            .master_username("admin")
            .master_user_password("unused-password"),
    };
    req.send().await.unwrap();
}

fn resolve_to_pg(host: &str) -> (&'static str, String) {
    let port = env().pg_port;
    ("SIDECAR_RESOLVE", format!("{host}:{port}=127.0.0.1:{port}"))
}

#[tokio::test]
async fn rds_instance_endpoint_wins_over_the_host_in_the_secret() {
    let role = unique("rdsi");
    let pw = password();
    create_role(&role, &pw).await;
    let instance = unique("inst").replace('_', "-");
    create_instance(&instance, &role, None).await;
    let conn_id = unique("rdsi");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &json!({"engine": "postgres", "host": "old-host.invalid", "port": 1, "username": role,
                "password": pw, "dbInstanceIdentifier": instance})
        .to_string(),
    )
    .await;
    let host = format!("{instance}.{DOMAIN}");
    let sc = Sidecar::start(Options {
        env: vec![resolve_to_pg(&host)],
        ..Default::default()
    })
    .await;
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["host"], host.as_str());
    assert_eq!(r.json["port"], env().pg_port);
    assert_eq!(r.json["schema"], role.as_str(), "database from RDS DBName");
}

#[tokio::test]
async fn aurora_cluster_writer_and_reader_endpoints() {
    let role = unique("aur");
    let pw = password();
    create_role(&role, &pw).await;
    let cluster = unique("clu").replace('_', "-");
    rds()
        .await
        .create_db_cluster()
        .db_cluster_identifier(&cluster)
        .engine("aurora-postgresql")
        .port(env().pg_port as i32)
        .database_name(&role)
        .master_username("admin")
        .master_user_password("unused-password")
        .send()
        .await
        .unwrap();
    let secret_id = unique("aurora-secret");
    put_secret(
        &secret_id,
        &json!({"username": role, "password": pw}).to_string(),
    )
    .await;
    let described = rds()
        .await
        .describe_db_clusters()
        .db_cluster_identifier(&cluster)
        .send()
        .await
        .unwrap();
    let writer = described.db_clusters()[0].endpoint().unwrap().to_string();
    let reader = described.db_clusters()[0]
        .reader_endpoint()
        .unwrap()
        .to_string();
    assert_ne!(writer, reader);
    let port = env().pg_port;
    // moto's cluster names carry a random part the test certificate cannot
    // cover: check the chain only.
    let config = format!(
        "[connections.aurora_w]\nsecret_id = \"{secret_id}\"\ndb_cluster = \"{cluster}\"\nsslmode = \"verify-ca\"\n\n\
         [connections.aurora_r]\nsecret_id = \"{secret_id}\"\ndb_cluster = \"{cluster}\"\nendpoint = \"reader\"\nsslmode = \"verify-ca\"\n"
    );
    let sc = Sidecar::start(Options {
        env: vec![(
            "SIDECAR_RESOLVE",
            format!("{writer}:{port}=127.0.0.1:{port},{reader}:{port}=127.0.0.1:{port}"),
        )],
        config: Some(config),
        ..Default::default()
    })
    .await;
    let w = sc.get("/connections/aurora_w").await;
    assert_eq!(w.status, 200, "{}", w.text);
    assert_eq!(w.json["host"], writer.as_str());
    assert_eq!(w.json["schema"], role.as_str());
    let r = sc.get("/connections/aurora_r").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["host"], reader.as_str());
}

/// A config entry naming only the instance: the secret comes from
/// `MasterUserSecret.SecretArn` (RDS-managed, only username and password).
#[tokio::test]
async fn rds_managed_master_secret_found_from_the_instance() {
    let master = unique("master");
    let instance = unique("managed").replace('_', "-");
    create_instance(&instance, "postgres", Some(&master)).await;
    let described = rds()
        .await
        .describe_db_instances()
        .db_instance_identifier(&instance)
        .send()
        .await
        .unwrap();
    let arn = described.db_instances()[0]
        .master_user_secret()
        .and_then(|s| s.secret_arn())
        .expect("moto creates the managed secret")
        .to_string();
    let value: serde_json::Value = serde_json::from_str(
        &sm()
            .await
            .get_secret_value()
            .secret_id(&arn)
            .send()
            .await
            .unwrap()
            .secret_string
            .unwrap(),
    )
    .unwrap();
    let pw = value["password"].as_str().unwrap().to_string();
    // moto names the managed user itself; create whatever it chose.
    let master = value["username"].as_str().unwrap().to_string();
    let admin = pg_admin().await;
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE \"{master}\" LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$; \
             ALTER ROLE \"{master}\" PASSWORD '{}'",
            pw.replace('\'', "''")
        ))
        .await
        .unwrap();

    let host = format!("{instance}.{DOMAIN}");
    let sc = Sidecar::start(Options {
        env: vec![resolve_to_pg(&host)],
        config: Some(format!(
            "[connections.managed]\ndb_instance = \"{instance}\"\n"
        )),
        ..Default::default()
    })
    .await;
    sc.forbid(&pw);
    let r = sc.get("/connections/managed").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["host"], host.as_str());
    assert_eq!(r.json["login"], master.as_str());
    assert_eq!(r.json["password"], pw.as_str());
    assert_eq!(r.json["schema"], "postgres");
}

/// A bare username/password secret tagged the way RDS tags its secrets.
#[tokio::test]
async fn rds_tags_on_the_secret_lead_to_the_endpoint() {
    let role = unique("tagged");
    let pw = password();
    create_role(&role, &pw).await;
    let instance = unique("tagged").replace('_', "-");
    create_instance(&instance, &role, None).await;
    let conn_id = unique("tagged");
    put_secret_tagged(
        &format!("airflow/connections/{conn_id}"),
        &json!({"username": role, "password": pw}).to_string(),
        &[(
            "aws:rds:primarydbinstancearn",
            &format!("arn:aws:rds:us-east-1:123456789012:db:{instance}"),
        )],
    )
    .await;
    let host = format!("{instance}.{DOMAIN}");
    let sc = Sidecar::start(Options {
        env: vec![resolve_to_pg(&host)],
        ..Default::default()
    })
    .await;
    let r = sc.get(&format!("/connections/{conn_id}")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["host"], host.as_str());
}

#[tokio::test]
async fn unknown_rds_instance_is_a_clear_upstream_error() {
    let conn_id = unique("ghost");
    put_secret(
        &format!("airflow/connections/{conn_id}"),
        &json!({"username": "u", "password": password(), "dbInstanceIdentifier": "no-such-instance"}).to_string(),
    )
    .await;
    let sc = Sidecar::start(Options::default()).await;
    let msg = sc
        .get(&format!("/connections/{conn_id}"))
        .await
        .expect_error(502, "upstream_error")
        .to_string();
    assert!(msg.contains("RDS instance no-such-instance"), "{msg}");
}
