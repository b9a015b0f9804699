//! What coordinators ask of this edge ([`EdgeCommand`]): deliver to some connections,
//! broadcast, disconnect, inspect. Each answer is an encoded protobuf message.

use std::collections::HashSet;
use std::sync::Arc;

use bus::{Outgoing, Subscription};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use prost::Message as _;
use proto::v1::{EdgeCommand, InspectReply, edge_command::Kind};

use crate::registry::{self, Registry, Tally};

pub(crate) fn run(reg: &Registry, cmd: EdgeCommand) -> Vec<u8> {
    let tally = match cmd.kind {
        None => Tally::default(),
        Some(Kind::Deliver(d)) => {
            let target = d.target.unwrap_or_default();
            let handles = reg.select(&target);
            let id = reg.message_id(&d.message_id);
            let payload = registry::Payload {
                bytes: &d.payload,
                binary: d.binary,
                compress: !d.uncompressed,
            };
            registry::deliver_typed(reg.metrics(), handles.iter(), &d.r#type, payload, id)
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
            let id = reg.message_id(&b.message_id);
            let payload = registry::Payload {
                bytes: &b.payload,
                binary: b.binary,
                compress: !b.uncompressed,
            };
            registry::deliver_typed(reg.metrics(), targets, &b.r#type, payload, id)
        }
        Some(Kind::Disconnect(d)) => {
            let handles = reg.select(&d.target.unwrap_or_default());
            let code = u16::try_from(d.code).unwrap_or(1000);
            registry::disconnect(&handles, code, &d.reason, d.hard)
        }
        Some(Kind::Census(_)) => Tally::default(),
        Some(Kind::Inspect(i)) => {
            let buffered_bytes = i
                .conn_ids
                .iter()
                .filter_map(|id| reg.get(id).map(|h| (id.clone(), h.buffered() as u64)))
                .collect();
            return InspectReply { buffered_bytes }.encode_to_vec();
        }
    };
    tracing::Span::current().record("delivered", tally.reached());
    tally.report(reg.node_id()).encode_to_vec()
}

/// Commands from coordinators on this node's subject and the all-edges subject.
pub(crate) async fn pump(
    registry: Arc<Registry>,
    subs: Vec<Subscription>,
    stop: CancellationToken,
) {
    let mut messages = futures::stream::select_all(subs);
    loop {
        let msg = tokio::select! {
            () = stop.cancelled() => break,
            m = messages.next() => match m { Some(m) => m, None => break },
        };
        let answer = match proto::v1::EdgeCommand::decode(msg.payload.as_ref()) {
            Ok(cmd) if bus::trace::is_traced(&msg.headers) => {
                // Only traced commands pay for a span: the trace runs from the backend's call
                // to the sockets this edge queued the frame for.
                let span = tracing::info_span!("edge.command", node = %registry.node_id(), delivered = tracing::field::Empty);
                bus::trace::follow(&span, &msg.headers);
                let _inside = span.enter();
                run(&registry, cmd)
            }
            Ok(cmd) => run(&registry, cmd),
            Err(error) => {
                tracing::warn!(%error, subject = %msg.subject, "undecodable edge command");
                continue;
            }
        };
        if let Some(reply) = msg.reply
            && let Err(error) = registry.bus().publish(Outgoing::new(reply, answer)).await
        {
            tracing::debug!(%error, "command answer not sent");
        }
    }
}
