//! The security suite: the trust boundary tried as an attacker would, against the real binary.

mod edge;
mod grpc;
mod nats;
mod tls;
mod tokens;
