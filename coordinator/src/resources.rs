//! `switchboard.v1.Resources`: items of key-value resource types, written to the same
//! buckets edges watch.

use std::collections::BTreeMap;

use bus::SharedStore;
use proto::v1::resources_server::Resources;
use proto::v1::{
    DeleteRequest, DeleteResponse, GetRequest, GetResponse, ListRequest, ListResponse, PutRequest,
    PutResponse,
};
use serde_json::{Map, Value};
use tonic::{Request, Response, Status};

/// Where a resource type's items live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceSpec {
    pub bucket: String,
    /// The item field that is its key.
    pub id_field: String,
}

/// Resource types by name; a type not listed uses a bucket of its own name, keyed by `id`.
#[derive(Debug, Clone)]
pub struct ResourcesService {
    store: SharedStore,
    specs: BTreeMap<String, ResourceSpec>,
}

impl ResourcesService {
    pub fn new(store: SharedStore, specs: BTreeMap<String, ResourceSpec>) -> Self {
        Self { store, specs }
    }

    fn spec(&self, resource: &str) -> Result<ResourceSpec, Status> {
        if resource.is_empty() {
            return Err(Status::invalid_argument("resource is required"));
        }
        let spec = self
            .specs
            .get(resource)
            .cloned()
            .unwrap_or_else(|| ResourceSpec {
                bucket: resource.to_owned(),
                id_field: "id".into(),
            });
        if !bus::store::is_valid_bucket(&spec.bucket) {
            return Err(Status::invalid_argument(format!(
                "{resource:?} is not a valid resource type"
            )));
        }
        Ok(spec)
    }
}

fn unavailable(e: &bus::StoreError) -> Status {
    Status::unavailable(format!("resource store: {e}"))
}

fn to_struct(v: &Value) -> Option<prost_types::Struct> {
    v.as_object().map(proto::json::to_struct)
}

#[tonic::async_trait]
impl Resources for ResourcesService {
    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let r = request.into_inner();
        let spec = self.spec(&r.resource)?;
        let item: Map<String, Value> = if r.item_json.is_empty() {
            r.item
                .as_ref()
                .map(proto::json::from_struct)
                .unwrap_or_default()
        } else {
            match serde_json::from_str(&r.item_json) {
                Ok(Value::Object(m)) => m,
                _ => return Err(Status::invalid_argument("item_json must be a JSON object")),
            }
        };
        let id = match item.get(&spec.id_field) {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(Status::invalid_argument(format!(
                    "the item needs an \"{}\" field",
                    spec.id_field
                )));
            }
        };
        let bytes = Value::Object(item).to_string();
        self.store
            .put(&spec.bucket, &id, bytes.into())
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Response::new(PutResponse { id }))
    }

    async fn delete(
        &self,
        request: Request<DeleteRequest>,
    ) -> Result<Response<DeleteResponse>, Status> {
        let r = request.into_inner();
        let spec = self.spec(&r.resource)?;
        if r.id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        self.store
            .delete(&spec.bucket, &r.id)
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(Response::new(DeleteResponse {}))
    }

    async fn get(&self, request: Request<GetRequest>) -> Result<Response<GetResponse>, Status> {
        let r = request.into_inner();
        let spec = self.spec(&r.resource)?;
        if r.id.is_empty() {
            return Err(Status::invalid_argument("id is required"));
        }
        let found = self
            .store
            .get(&spec.bucket, &r.id)
            .await
            .map_err(|e| unavailable(&e))?;
        let item = found
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .and_then(|v| to_struct(&v));
        Ok(Response::new(GetResponse {
            found: item.is_some(),
            item,
        }))
    }

    async fn list(&self, request: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        let r = request.into_inner();
        let spec = self.spec(&r.resource)?;
        let params = r
            .params
            .as_ref()
            .map(proto::json::from_struct)
            .unwrap_or_default();
        let entries = self
            .store
            .list(&spec.bucket)
            .await
            .map_err(|e| unavailable(&e))?;
        let items = entries
            .iter()
            .filter_map(|(_, b)| serde_json::from_slice::<Value>(b).ok())
            .filter(|v| params.iter().all(|(k, p)| v.get(k) == Some(p)))
            .filter_map(|v| to_struct(&v))
            .collect();
        Ok(Response::new(ListResponse { items }))
    }
}
