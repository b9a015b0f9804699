//! The `switchboard` binary's library half: configuration loading and the wiring of each
//! mode, so that tests can start a whole node in-process exactly as the binary does.
//!
//! | module | what |
//! | --- | --- |
//! | [`config`] | defaults < file < environment < flags; errors name the key |
//! | [`demo`] | the demo page `switchboard dev` serves at `/` (the JavaScript client's bundle) |
//! | [`nats`] | the `nats:` block: credentials and TLS, resolved at load |
//! | [`run`] | each mode wired (`edge`, `coordinator`, `dev`), signal handling |
//! | [`telemetry`] | logs and OpenTelemetry traces |
//! | [`tls`] | certificates from files, reloaded on change or SIGHUP |
//! | [`token`] | `switchboard token` and `switchboard api-key`: a test JWT, a fresh API key |

pub mod config;
pub mod demo;
pub mod nats;
pub mod run;
pub mod telemetry;
pub mod tls;
pub mod token;
