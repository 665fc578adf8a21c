//! The relay proper: the one upstream client, request preparation, and SSE pass-through.
//!
//! Everything that talks to the upstream lives here, so that failover across several keys or
//! providers can later replace [`upstream::Upstream`] without touching the handlers.

pub mod chat;
pub mod sse;
pub mod upstream;

pub use upstream::Upstream;
