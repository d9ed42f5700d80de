//! airflow-secrets-sidecar: Airflow connections from AWS Secrets Manager and
//! RDS, served only after they have been proven to log in to Postgres.
//!
//! Layers, outermost first:
//! - [`http`] / [`admin`]: the two listeners;
//! - [`resolve`]: the pipeline (map → fetch → endpoint → validate → answer),
//!   with [`cache`] in front of it;
//! - [`sources`]: Secrets Manager and RDS; [`validate`]: the Postgres login;
//! - [`credential`] (secret shapes in) and [`airflow`] (connection JSON out).

pub mod admin;
pub mod airflow;
pub mod cache;
pub mod config;
pub mod credential;
pub mod error;
pub mod http;
pub mod metrics;
pub mod resolve;
pub mod rotation;
pub mod sources;
pub mod token;
pub mod unvalidated;
pub mod validate;
