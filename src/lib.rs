//! airflow-secrets-sidecar: Airflow connections from AWS Secrets Manager and
//! RDS, served only after they have been proven to log in to Postgres.
//!
//! Layers, outermost first:
//! - [`http`] / [`admin`]: the two listeners;
//! - [`front`]: one state per key ([`keys`], [`state`]), single-flight,
//!   stale-if-error and backoff, bounds on expensive requests; [`refresh`]: refresh-ahead;
//!   [`prefetch`]: start-up prefetch;
//!   [`rotation`]: rotation checks; [`variables`]: variables;
//! - [`resolve`]: the pipeline, top to bottom (map → fetch → locate →
//!   prove, walking the rotation stages → answer), calling [`source`],
//!   [`aws`] (the cached AWS layer over [`sources`]), [`login_plan`],
//!   [`validate`] and [`stages`];
//! - [`credential`] (secret shapes in) and [`airflow`] (connection JSON out).


// No unsafe code, but for the one allocator call in `alloc` (glibc's
// malloc_trim), allowed there only. (`forbid` could not be lifted there.)
#![deny(unsafe_code)]
pub mod admin;
pub mod airflow;
pub mod alloc;
pub mod auth_guard;
pub mod aws;
pub mod cache;
pub mod config;
pub mod connections;
pub mod credential;
pub mod error;
pub mod front;
pub mod http;
pub mod keys;
pub mod login_plan;
pub mod metrics;
pub mod prefetch;
pub mod refresh;
pub mod resolve;
pub mod rotation;
pub mod secret_files;
pub mod source;
pub mod sources;
pub mod stages;
pub mod state;
pub mod token;
pub mod unvalidated;
pub mod validate;
pub mod variables;
