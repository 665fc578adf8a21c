//! relay: an OpenAI API relay server. See README.md for what it does and how to run it.

pub mod app;
pub mod auth;
pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod http;
pub mod measure;
pub mod mock;
pub mod probe;
pub mod ratelimit;
pub mod relay;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod turn;
pub mod usage;
