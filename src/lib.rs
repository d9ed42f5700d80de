//! airflow-secrets-sidecar: Airflow connections from AWS Secrets Manager and
//! RDS, served only after they have been proven to log in to Postgres.
//!
//! Layers, outermost first; each uses only those below it:
//! - [`server`]: the two listeners (routes, TCP connections, the token);
//! - [`service`]: one state per key ([`service::state`], changed only in
//!   [`service::keys::Keys::apply`]), single-flight, stale-if-error and
//!   backoff, bounds on expensive requests ([`service::resolver`]),
//!   refresh-ahead, start-up prefetch, rotation checks, variables;
//! - [`pipeline`]: the resolution, top to bottom in
//!   [`pipeline::Pipeline::resolve`] (map → fetch → locate → prove, walking
//!   the rotation stages → answer);
//! - [`aws`] (Secrets Manager and RDS, cached; failures typed in
//!   [`aws::calls`]), [`postgres`] (login proofs, the password guard, files a
//!   secret names) and [`airflow`] (secret shapes in, connection JSON out);
//! - beside them: [`config`] (settings), [`error`] (the error model),
//!   [`cache`] (what is served, and the TTL cache), [`telemetry`] (metrics).

// No unsafe code, but for the one allocator call in `alloc` (glibc's
// malloc_trim), allowed there only. (`forbid` could not be lifted there.)
#![deny(unsafe_code)]
mod airflow;
mod alloc;
mod aws;
mod cache;
mod config;
mod error;
mod pipeline;
mod postgres;
mod server;
mod service;
mod telemetry;

// The public surface: what the binary (src/main.rs) wires together.
pub use aws::calls::load_aws_config;
pub use config::{Cli, Command, LogFormat, Settings};
pub use server::token::TokenStore;
pub use server::{admin, http};
pub use service::prefetch;
pub use service::refresh::refresh_ahead;
pub use service::resolver::Resolver;
pub use telemetry::metrics::Metrics;
