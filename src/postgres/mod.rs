//! Logging in to Postgres, safely: the login proof and its cache
//! ([`validate`]), the guard that keeps a password from a server that was
//! not verified ([`auth_guard`]), and the bounded reads of files a secret
//! names ([`secret_files`]).

pub mod auth_guard;
pub mod secret_files;
pub mod validate;
