//! The four systems Switchboard replaces (docs/PROTOCOL.md §9): what each documents of its
//! WebSocket gateway, replayed against a cluster configured with its example in
//! `deploy/examples/`.

mod bodhi;
mod hyperexpress;
mod monorail;
mod monument;
