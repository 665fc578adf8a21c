//! The integration tests, one crate: the whole relay over real HTTP on SQLite and PostgreSQL,
//! the memory and the Redis rate limiter, the `relay` binary, and the OpenAPI snapshot. One
//! crate means `support` is compiled once and the tests link into a single binary.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on failure by design

mod support;

mod admin;
mod api_keys;
mod auth;
mod chat;
mod hardening;
mod hostile_bodies;
mod http;
mod metrics;
mod openapi;
mod ratelimit;
mod responses;
mod startup;
mod tokens;
mod upstream;
mod usage;
