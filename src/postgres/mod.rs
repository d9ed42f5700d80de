//! Logging in to Postgres, safely: the login check ([`validate`], with
//! the certificate verifiers rustls lacks) and its cache ([`proofs`]), the guard that keeps a password from a server that was
//! not verified ([`auth_guard`]), and the bounded reads of files a secret
//! names ([`secret_files`]).

pub mod auth_guard;
pub mod proofs;
pub mod secret_files;
pub mod validate;
mod verifiers;
