//! Integration tests: the real binary over HTTP, against a real Postgres
//! (SCRAM, TLS with a test CA) and moto_server, all on loopback.

mod faults;
mod support;

mod admin;
mod api;
mod cache;
mod failure_modes;
mod hardening;
mod prefetch;
mod rds;
mod rotation;
mod types;
mod validation;
