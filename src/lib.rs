//! The `switchboard` binary's library half: configuration loading and the wiring of each
//! mode, so that tests can start a whole node in-process exactly as the binary does.
//!
//! | module | what |
//! | --- | --- |
//! | [`config`] | defaults < file < environment < flags; errors name the key |
//! | [`nats`] | the `nats:` block: credentials and TLS, resolved at load |
//! | [`run`] | the modes (`dev`), signal handling |
//! | [`telemetry`] | logging setup |
//! | [`tls`] | certificates from files, reloaded on change or SIGHUP |

pub mod config;
pub mod nats;
pub mod run;
pub mod telemetry;
pub mod tls;
pub mod token;
