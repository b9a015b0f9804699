//! A configured route, compiled once at start: its config, the routing field in effect, its
//! token verifier, what each connection's session needs of it, and the WebSocket limits.

use std::sync::Arc;

use proto::frame::Key;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::auth::{RouteKeys, Verifier};
use crate::config::RouteConfig;

/// tungstenite's read buffer per connection, allocated up front. Client frames are small;
/// a larger one grows the buffer while it is read, up to the route's `max_payload`.
const READ_BUFFER: usize = 1024;

/// A configured route, compiled.
#[derive(Debug)]
pub struct Route {
    pub cfg: RouteConfig,
    /// The routing field in effect (`cfg.key()`), resolved once.
    pub key: Key,
    pub(crate) verifier: Verifier,
    /// What each connection's session needs of the route.
    pub(crate) rules: Arc<edge_core::session::Rules>,
    pub(crate) ws: WebSocketConfig,
    /// What the route's connections hold of compression state, against its budget.
    pub(crate) deflate_budget: Arc<crate::transport::deflate::Budget>,
}

/// The session's view of a route's config.
fn session_rules(
    cfg: &RouteConfig,
    anonymous: bool,
    history: &[bus::history::Rule],
    resume: Option<&proto::resume::Key>,
) -> edge_core::session::Rules {
    use edge_core::session as s;
    let onmessage = cfg.hooks.onmessage.as_ref();
    s::Rules {
        dialect: cfg.dialect,
        key: cfg.key(),
        idle_timeout: cfg.idle_timeout,
        heartbeat_interval: cfg.heartbeat.interval,
        heartbeat_timeout: cfg.heartbeat.timeout,
        rate: s::RateLimit {
            per_second: cfg.rate_limit.per_second,
            burst: cfg.rate_limit.burst,
            close_after: cfg.rate_limit.close_after,
        },
        max_topics: cfg.max_topics,
        max_inflight: cfg.max_inflight,
        client_publish: cfg.publish,
        events: s::EventRoutes {
            hooked: onmessage.is_some(),
            typed: onmessage.map_or_else(Vec::new, |h| {
                h.types
                    .iter()
                    .map(|t| (t.event_type.clone(), t.publish.clone()))
                    .collect()
            }),
            general: onmessage.and_then(|h| h.publish.clone()),
        },
        onconnect: cfg.hooks.onconnect.as_ref().map(|h| s::ConnectHook {
            subject: h.publish.clone(),
            required: h.required,
        }),
        monument: s::MonumentModes {
            data: cfg.monument.data(),
            passthrough: cfg.monument.passthrough(),
        },
        resources: cfg
            .resources
            .iter()
            .map(|(name, r)| {
                let resource = s::Resource {
                    kind: r.kind,
                    id_field: r.id_field.clone(),
                };
                (name.clone(), resource)
            })
            .collect(),
        token: (!anonymous).then_some(s::TokenPolicy {
            leeway: cfg.auth.leeway,
            refresh_lead: cfg.auth.refresh_lead,
        }),
        // Every rule of the edge applies here (storage is shared); clients read with the
        // `history` verb only what this route's own rules allow.
        history: history
            .iter()
            .map(|r| edge_core::history::Rule {
                pattern: r.pattern.clone(),
                size: r.size,
                read: cfg.history.iter().any(|h| h.topics == r.pattern && h.read),
            })
            .collect(),
        resume: resume
            .filter(|_| !cfg.resume.ttl.is_zero())
            .map(|key| s::ResumeRules {
                key: key.clone(),
                ttl: cfg.resume.ttl,
                route: cfg.path.clone(),
                onconnect: cfg.resume.onconnect,
            }),
    }
}

impl Route {
    /// Compiles route `cfg` with its key material (read by the binary); the error says
    /// what is wrong with the keys.
    /// `history`: every history rule of the edge.
    pub(crate) fn new(
        cfg: &RouteConfig,
        keys: &RouteKeys,
        history: &[bus::history::Rule],
    ) -> Result<Self, String> {
        let verifier = Verifier::new(cfg, keys)?;
        let ws = WebSocketConfig::default()
            .read_buffer_size(READ_BUFFER)
            .write_buffer_size(8 * 1024)
            .max_write_buffer_size(cfg.outbound.max_bytes.max(64 * 1024) * 2)
            .max_message_size(Some(cfg.max_payload))
            .max_frame_size(Some(cfg.max_payload));
        Ok(Self {
            key: cfg.key(),
            rules: Arc::new(session_rules(
                cfg,
                verifier.anonymous(),
                history,
                keys.resume.as_ref(),
            )),
            cfg: cfg.clone(),
            verifier,
            ws,
            deflate_budget: Arc::new(crate::transport::deflate::Budget::new(
                cfg.compression.memory_budget,
            )),
        })
    }
}
