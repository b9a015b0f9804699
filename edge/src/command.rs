//! What coordinators ask of this edge ([`EdgeCommand`]): deliver to some connections,
//! broadcast, disconnect, inspect. Each answer is an encoded protobuf message.

use std::collections::HashSet;

use prost::Message as _;
use proto::v1::{EdgeCommand, InspectReply, edge_command::Kind};

use crate::registry::{self, Tally};
use crate::server::Shared;

pub(crate) fn run(shared: &Shared, cmd: EdgeCommand) -> Vec<u8> {
    let reg = &shared.registry;
    let tally = match cmd.kind {
        None => Tally::default(),
        Some(Kind::Deliver(d)) => {
            let target = d.target.unwrap_or_default();
            let handles = reg.select(&target);
            registry::deliver_typed(shared, handles.iter(), &d.r#type, &d.payload)
        }
        Some(Kind::Broadcast(b)) => {
            let skip_conns: HashSet<&str> = b.skip_conn_ids.iter().map(String::as_str).collect();
            let skip_users: HashSet<&str> = b.skip_users.iter().map(String::as_str).collect();
            let all = reg.all();
            let targets = all.iter().filter(|h| {
                let info = h.info();
                (b.namespace.is_empty() || info.namespace == b.namespace)
                    && !skip_users.contains(info.user.as_str())
                    && !skip_conns.contains(info.id.to_string().as_str())
            });
            registry::deliver_typed(shared, targets, &b.r#type, &b.payload)
        }
        Some(Kind::Disconnect(d)) => {
            let handles = reg.select(&d.target.unwrap_or_default());
            let code = u16::try_from(d.code).unwrap_or(1000);
            registry::disconnect(&handles, code, &d.reason, d.hard)
        }
        Some(Kind::Inspect(i)) => {
            let buffered_bytes = i
                .conn_ids
                .iter()
                .filter_map(|id| reg.get(id).map(|h| (id.clone(), h.buffered() as u64)))
                .collect();
            return InspectReply { buffered_bytes }.encode_to_vec();
        }
    };
    tracing::Span::current().record("delivered", tally.delivered);
    tally.report(&shared.node_id).encode_to_vec()
}
