//! Integration tests: the real binary over HTTP, against a real Postgres
//! (SCRAM, TLS with a test CA) and moto_server, all on loopback.

mod fake_pg;
mod faults;
mod support;

mod admin;
mod api;
mod bounds;
mod cache;
mod failure_modes;
mod hardening;
mod passwords;
mod prefetch;
mod rds;
mod rotation;
mod secret_files;
mod types;
mod validation;
