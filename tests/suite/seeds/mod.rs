//! The seed systems (`shared/seeds/00N_…`, PROTOCOL.md §4): what each documents of its
//! WebSocket gateway, replayed against a cluster configured with its example in
//! `deploy/examples/`.

mod bodhi;
mod hyperexpress;
mod monorail;
mod monument;
