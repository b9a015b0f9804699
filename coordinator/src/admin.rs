//! `switchboard.v1.Admin`: operator actions. `Revoke` writes an entry to the revocation
//! bucket, which every edge watches; the edges close the matching connections themselves.
//! The `admin` scope is checked by the gRPC auth layer, not here.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bus::SharedStore;
use proto::revoke::{Kind, MAX_TTL_SECS, Revocation};
use proto::v1::admin_server::Admin;
use proto::v1::revoke_request::Target;
use proto::v1::{RevokeRequest, RevokeResponse};
use tonic::{Request, Response, Status};

/// The longest `jti`, `sub` or namespace accepted (a bucket key holds all three).
const MAX_FIELD: usize = 256;

/// The Admin service over the store that holds the revocation bucket.
#[derive(Debug, Clone)]
pub struct AdminService {
    store: SharedStore,
    bucket: String,
}

impl AdminService {
    pub fn new(store: SharedStore, bucket: String) -> Self {
        Self { store, bucket }
    }
}

/// The entry a request asks for, at `now` (Unix seconds); `Err` names the bad field.
fn revocation(r: RevokeRequest, now: i64) -> Result<Revocation, Status> {
    let (kind, value) = match r.target {
        Some(Target::Jti(v)) => (Kind::Jti, v),
        Some(Target::Sub(v)) => (Kind::Sub, v),
        None => return Err(Status::invalid_argument("set jti or sub")),
    };
    if value.is_empty() || value.len() > MAX_FIELD {
        return Err(Status::invalid_argument(
            "jti or sub must be 1 to 256 bytes",
        ));
    }
    if r.namespace.len() > MAX_FIELD {
        return Err(Status::invalid_argument(
            "namespace is longer than 256 bytes",
        ));
    }
    let ttl = r
        .ttl
        .and_then(|d| Duration::try_from(d).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| Status::invalid_argument("ttl is required and must be positive"))?;
    if ttl.as_secs() > MAX_TTL_SECS {
        return Err(Status::invalid_argument(format!(
            "ttl is longer than {MAX_TTL_SECS}s (the bucket's max age)"
        )));
    }
    let until = now.saturating_add(ttl.as_secs_f64().ceil() as i64);
    Ok(Revocation {
        kind,
        value,
        namespace: (!r.namespace.is_empty()).then_some(r.namespace),
        until,
        reason: r.reason.chars().take(MAX_FIELD).collect(),
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn revoke(
        &self,
        request: Request<RevokeRequest>,
    ) -> Result<Response<RevokeResponse>, Status> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut entry = revocation(request.into_inner(), now)?;
        // A second revocation of the same token never shortens the first. (Two revocations
        // racing each other may still write the shorter last; both are logged.)
        let earlier = self
            .store
            .get(&self.bucket, &entry.key())
            .await
            .map_err(|e| Status::unavailable(format!("revocation store: {e}")))?;
        if let Some(earlier) = earlier.and_then(|v| serde_json::from_slice::<Revocation>(&v).ok()) {
            entry.until = entry.until.max(earlier.until);
        }
        let value =
            serde_json::to_vec(&entry).map_err(|_| Status::internal("revocation not encoded"))?;
        self.store
            .put(&self.bucket, &entry.key(), value.into())
            .await
            .map_err(|e| Status::unavailable(format!("revocation store: {e}")))?;
        tracing::info!(kind = ?entry.kind, namespace = ?entry.namespace, until = entry.until, reason = %entry.reason, "token revoked");
        Ok(Response::new(RevokeResponse { until: entry.until }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(target: Option<Target>, ttl_secs: i64) -> RevokeRequest {
        RevokeRequest {
            target,
            namespace: String::new(),
            ttl: Some(prost_types::Duration {
                seconds: ttl_secs,
                nanos: 0,
            }),
            reason: "leak".into(),
        }
    }

    #[test]
    fn requests_become_entries_or_named_errors() {
        let r = revocation(req(Some(Target::Jti("t1".into())), 60), 1000).unwrap();
        assert_eq!((r.kind, r.value.as_str(), r.until), (Kind::Jti, "t1", 1060));
        assert_eq!(r.namespace, None);
        let e = revocation(req(None, 60), 0).unwrap_err();
        assert!(e.message().contains("jti or sub"), "{e}");
        let e = revocation(req(Some(Target::Sub(String::new())), 60), 0).unwrap_err();
        assert!(e.message().contains("1 to 256"), "{e}");
        let e = revocation(req(Some(Target::Sub("a".into())), 0), 0).unwrap_err();
        assert!(e.message().contains("ttl"), "{e}");
        let week = MAX_TTL_SECS as i64;
        assert!(revocation(req(Some(Target::Sub("a".into())), week + 1), 0).is_err());
        assert!(revocation(req(Some(Target::Sub("a".into())), week), 0).is_ok());
    }
}
