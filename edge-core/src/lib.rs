//! The edge's pure core, in the manner of quinn-proto: state machines that take input and
//! the time as parameters and return what is to be done. It does no I/O, reads no clock and
//! holds no runtime: the `edge` crate's shell drives it (sockets, bus, timers), and
//! `scripts/check-layers` fails the build if tokio, the bus or a socket type creeps in.
//!
//! | module | what |
//! | --- | --- |
//! | [`dialect`] | the dialect table: one row per dialect (routing key, verbs, field names, answers) |
//! | [`history`] | positions in topic history: a pump's live feed (next, repeat, gap), recovery, history pages |
//! | [`verb`] | the built-in verbs, parsed once |
//! | [`session`] | one connection's protocol: a frame in, actions out; its timers as deadlines |
//! | [`recent`] | one connection's recent message ids: a backend's retry reaches it at most once |
//! | [`index`] | connections, users and topic filters with their subscribers; each change yields its report delta |
//! | [`report`] | the ordered, bounded delta log: batches, and the full-report fallback |
//! | [`router`] | the uplink's ring router: which coordinator each delta goes to, full shares |

pub mod dialect;
pub mod history;
pub mod index;
pub mod recent;
pub mod report;
pub mod router;
pub mod session;
pub mod verb;

pub use dialect::Dialect;
pub use session::{Action, Session};
pub use verb::Verb;
