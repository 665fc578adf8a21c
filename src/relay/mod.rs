//! The relay proper: the one entry point to the upstream ([`Upstream`]), request preparation,
//! SSE pass-through, model policy, and what the client is told when the upstream fails.
//!
//! Everything that talks to the upstream lives here, so that failover across several keys or
//! providers can later replace what is behind [`Upstream`] without touching the handlers.
//! Handlers call one function per endpoint (e.g. [`chat::complete`]).

pub mod body;
pub mod chat;
pub mod client;
pub mod embeddings;
pub mod errors;
pub mod h1;
pub mod models;
pub mod pool;
pub mod response_view;
pub mod responses;
pub mod scan;
pub mod sse;

pub use client::Upstream;
pub use models::{Model, ModelPolicy};
