//! The two listeners and what guards them: the credential API ([`http`];
//! its endpoints and responses in `routes`;
//! its TCP connections in [`tcp`], the token in [`token`]) and the admin
//! port ([`admin`]: probes and metrics, no secrets).

pub mod admin;
pub mod http;
mod routes;
pub mod tcp;
pub mod token;
