//! The gRPC services: proto ↔ domain, and domain errors → `Status` (only here).

use std::collections::BTreeMap;

use proto::v1::messaging_server::Messaging;
use proto::v1::placement_server::Placement;
use proto::v1::{
    BroadcastRequest, DeliveryReport, DisconnectRequest, ListConnectionsRequest,
    ListConnectionsResponse, LocateRequest, LocateResponse, PublishRequest, SendRequest, Target,
};
use tonic::{Request, Response, Status};

use crate::messaging::{Coordinator, DeliveryError};
use crate::placement::Filter;

/// Largest ListConnections page.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

/// `switchboard.v1.Messaging`.
#[derive(Debug, Clone)]
pub struct MessagingService(pub Coordinator);

/// `switchboard.v1.Placement`.
#[derive(Debug, Clone)]
pub struct PlacementService(pub Coordinator);

impl From<DeliveryError> for Status {
    fn from(e: DeliveryError) -> Self {
        match e {
            DeliveryError::InvalidArgument(m) => Status::invalid_argument(m),
            DeliveryError::Bus(e) => Status::unavailable(format!("bus unavailable: {e}")),
        }
    }
}

/// The payload as JSON text: `payload_json` verbatim (checked), else `payload`, else null.
fn payload(value: Option<&prost_types::Value>, json: &str) -> Result<Vec<u8>, Status> {
    if !json.is_empty() {
        serde_json::from_str::<&serde_json::value::RawValue>(json).map_err(|e| {
            Status::invalid_argument(format!("payload_json is not valid JSON: {e}"))
        })?;
        return Ok(json.as_bytes().to_vec());
    }
    Ok(value
        .map_or(serde_json::Value::Null, proto::json::from_value)
        .to_string()
        .into_bytes())
}

fn target(namespace: String, user: String, conn_id: String) -> Result<Target, Status> {
    if conn_id.is_empty() && user.is_empty() {
        return Err(Status::invalid_argument("set user or conn_id"));
    }
    let conn_ids = if conn_id.is_empty() {
        Vec::new()
    } else {
        vec![conn_id]
    };
    Ok(Target {
        namespace,
        user,
        conn_ids,
    })
}

#[tonic::async_trait]
impl Messaging for MessagingService {
    #[tracing::instrument(skip_all, fields(ns = %request.get_ref().namespace, user = %request.get_ref().user))]
    async fn send(
        &self,
        request: Request<SendRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let r = request.into_inner();
        if r.r#type.is_empty() {
            return Err(Status::invalid_argument("type is required"));
        }
        let body = payload(r.payload.as_ref(), &r.payload_json)?;
        let target = target(r.namespace, r.user, r.conn_id)?;
        Ok(Response::new(self.0.send(target, r.r#type, body).await?))
    }

    #[tracing::instrument(skip_all, fields(ns = %request.get_ref().namespace))]
    async fn broadcast(
        &self,
        request: Request<BroadcastRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let r = request.into_inner();
        if r.r#type.is_empty() {
            return Err(Status::invalid_argument("type is required"));
        }
        let body = payload(r.payload.as_ref(), &r.payload_json)?;
        let b = proto::v1::Broadcast {
            namespace: r.namespace,
            r#type: r.r#type,
            payload: body,
            skip_conn_ids: r.skip_conn_ids,
            skip_users: r.skip_users,
        };
        Ok(Response::new(self.0.broadcast(b).await?))
    }

    #[tracing::instrument(skip_all, fields(ns = %request.get_ref().namespace, topic = %request.get_ref().topic))]
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let r = request.into_inner();
        if r.namespace.is_empty() {
            return Err(Status::invalid_argument("namespace is required"));
        }
        let body = payload(r.payload.as_ref(), &r.payload_json)?;
        Ok(Response::new(
            self.0.publish(&r.namespace, &r.topic, body).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(ns = %request.get_ref().namespace, user = %request.get_ref().user))]
    async fn disconnect(
        &self,
        request: Request<DisconnectRequest>,
    ) -> Result<Response<DeliveryReport>, Status> {
        let r = request.into_inner();
        let code = if r.code == 0 { 1000 } else { r.code };
        if !(1000..=4999).contains(&code) || matches!(code, 1004..=1006 | 1015) {
            return Err(Status::invalid_argument(format!(
                "{code} is not a close code a server may send"
            )));
        }
        if r.reason.len() > 123 {
            return Err(Status::invalid_argument("reason is longer than 123 bytes"));
        }
        let target = target(r.namespace, r.user, r.conn_id)?;
        Ok(Response::new(
            self.0.disconnect(target, code, r.reason, r.hard).await?,
        ))
    }
}

#[tonic::async_trait]
impl Placement for PlacementService {
    async fn locate(
        &self,
        request: Request<LocateRequest>,
    ) -> Result<Response<LocateResponse>, Status> {
        let r = request.into_inner();
        if r.user.is_empty() {
            return Err(Status::invalid_argument("user is required"));
        }
        let connections = self.0.directory().locate(&r.namespace, &r.user);
        Ok(Response::new(LocateResponse { connections }))
    }

    async fn list_connections(
        &self,
        request: Request<ListConnectionsRequest>,
    ) -> Result<Response<ListConnectionsResponse>, Status> {
        let r = request.into_inner();
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let filter = Filter {
            namespace: r.namespace,
            user: r.user,
            node_id: r.node_id,
            topic: r.topic,
        };
        let (mut connections, next) = self.0.directory().list(&filter, &r.page_token, size);
        // Buffered bytes are live: ask each edge about its connections on this page.
        let mut by_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in &connections {
            by_node
                .entry(c.node_id.clone())
                .or_default()
                .push(c.conn_id.clone());
        }
        let asks = by_node.into_iter().map(|(node, ids)| {
            let coord = self.0.clone();
            async move { coord.inspect(&node, ids).await }
        });
        let mut buffered = std::collections::HashMap::new();
        for reply in futures::future::join_all(asks).await {
            buffered.extend(reply.buffered_bytes);
        }
        for c in &mut connections {
            c.buffered_bytes = buffered.get(&c.conn_id).copied().unwrap_or(0);
        }
        Ok(Response::new(ListConnectionsResponse {
            connections,
            next_page_token: next.unwrap_or_default(),
        }))
    }
}
