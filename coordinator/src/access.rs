//! Who may call what on the gRPC listener: API keys with scopes for backends and operators,
//! node credentials ([`proto::credential`]) for edges and peer coordinators. Pure: the
//! binary resolves the secrets, [`crate::grpc`] applies [`Access::check`] to every call
//! before any service sees it.
//!
//! | caller | may call |
//! | --- | --- |
//! | API key with `read` | Placement, Resources.Get/List |
//! | API key with `messaging` | Messaging |
//! | API key with `resources` | Resources.Put/Delete |
//! | API key with `admin` | everything a key may call, and Admin |
//! | edge credential | EdgeReport (as itself only) and Placement.ListNodes |
//! | coordinator credential | Placement and Messaging (peer forwarding) |
//! | anyone | Health and reflection, unless configured otherwise |
//!
//! No API key can open EdgeReport, and no node credential can call Admin or Resources.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use proto::credential::{self, Role};

/// The `coordinator.api` block.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Keys backends and operators present as `authorization: Bearer <key>`.
    pub keys: Vec<ApiKeyConfig>,
    /// Serve gRPC with no authentication at all (only where the network is the boundary).
    /// Outside `dev`, a coordinator without keys refuses to start unless this is set.
    pub insecure: bool,
    /// `grpc.health.v1.Health` needs no key. Default true.
    pub open_health: bool,
    /// Server reflection needs no key. Default true.
    pub open_reflection: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            insecure: false,
            open_health: true,
            open_reflection: true,
        }
    }
}

/// One API key: where its secret is and what it may do. The secret itself never appears in
/// the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Shown in logs and metrics instead of the key.
    pub name: String,
    /// An environment variable holding the key.
    #[serde(default)]
    pub secret_env: Option<String>,
    /// A file holding the key (surrounding whitespace is ignored).
    #[serde(default)]
    pub secret_file: Option<std::path::PathBuf>,
    pub scopes: Vec<Scope>,
}

/// What an API key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Messaging,
    Resources,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Messaging => "messaging",
            Self::Resources => "resources",
            Self::Admin => "admin",
        }
    }
}

/// A key ready to compare: only its digest is kept.
#[derive(Clone)]
pub struct ApiKey {
    name: String,
    digest: [u8; 32],
    scopes: Vec<Scope>,
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKey")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

impl ApiKey {
    pub fn new(name: String, secret: &[u8], scopes: Vec<Scope>) -> Self {
        Self {
            name,
            digest: Sha256::digest(secret).into(),
            scopes,
        }
    }

    fn allows(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == Scope::Admin)
    }
}

/// Who made a call that passed [`Access::check`]; services find it in the request's
/// extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An open method (health, reflection) or an insecure listener.
    Anonymous,
    /// An API key, by name.
    Key(String),
    /// A node of the cluster, by its credential.
    Node(credential::Node),
}

impl Caller {
    /// The caller the access layer admitted, from the request's extensions (anonymous when
    /// the request did not pass it, as in unit tests).
    pub fn of<T>(request: &tonic::Request<T>) -> Self {
        request
            .extensions()
            .get::<Self>()
            .cloned()
            .unwrap_or(Self::Anonymous)
    }

    /// Only a peer coordinator may ask for "your own share only" answers.
    pub fn is_coordinator(&self) -> bool {
        matches!(self, Self::Node(n) if n.role == Role::Coordinator)
    }
}

/// Why a call was refused; [`Refusal::reason`] is its metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("missing credentials: send authorization: Bearer <api key>")]
    Missing,
    #[error("unknown credentials")]
    Unknown,
    #[error("this key lacks the {0} scope")]
    Scope(&'static str),
    #[error("this method is for cluster nodes only")]
    NodesOnly,
    #[error("no cluster secret is configured: edges cannot report here")]
    NoClusterSecret,
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Unknown => "unknown",
            Self::Scope(_) => "scope",
            Self::NodesOnly => "nodes_only",
            Self::NoClusterSecret => "no_cluster_secret",
        }
    }

    /// `UNAUTHENTICATED` when the caller is unknown, `PERMISSION_DENIED` when known but not
    /// allowed.
    pub fn permission_denied(&self) -> bool {
        matches!(self, Self::Scope(_) | Self::NodesOnly)
    }
}

/// The access policy of one gRPC listener. Its `Debug` shows no secret.
#[derive(Clone)]
pub struct Access {
    keys: Vec<ApiKey>,
    cluster_secret: Option<Vec<u8>>,
    /// No keys and `insecure` (or the embedded mode): key-scoped methods are open.
    open_api: bool,
    /// No cluster secret and `cluster.insecure`: EdgeReport is open to anyone.
    open_cluster: bool,
    open_health: bool,
    open_reflection: bool,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("keys", &self.keys)
            .field(
                "cluster_secret",
                &self.cluster_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("open_api", &self.open_api)
            .field("open_cluster", &self.open_cluster)
            .field("open_health", &self.open_health)
            .field("open_reflection", &self.open_reflection)
            .finish()
    }
}

/// What a method needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    Health,
    Reflection,
    Scope(Scope),
    /// EdgeReport: an edge's credential.
    Edge,
}

impl Access {
    /// `open_api`: serve key-scoped methods without keys (only when `keys` is empty).
    /// `open_cluster`: let anyone open EdgeReport (only when no cluster secret is set).
    pub fn new(
        cfg: &ApiConfig,
        keys: Vec<ApiKey>,
        cluster_secret: Option<Vec<u8>>,
        open_api: bool,
        open_cluster: bool,
    ) -> Self {
        Self {
            open_api: open_api && keys.is_empty(),
            open_cluster: open_cluster && cluster_secret.is_none(),
            keys,
            cluster_secret,
            open_health: cfg.open_health,
            open_reflection: cfg.open_reflection,
        }
    }

    /// Decides a call to the gRPC `path` (`/package.Service/Method`) carrying the
    /// `authorization` header value `auth`.
    pub fn check(&self, path: &str, auth: Option<&[u8]>) -> Result<Caller, Refusal> {
        let need = need(path);
        match need {
            Need::Health if self.open_health => return Ok(Caller::Anonymous),
            Need::Reflection if self.open_reflection => return Ok(Caller::Anonymous),
            Need::Edge if self.open_cluster => return Ok(Caller::Anonymous),
            Need::Edge if self.cluster_secret.is_none() => return Err(Refusal::NoClusterSecret),
            Need::Scope(_) | Need::Health | Need::Reflection if self.open_api => {
                return Ok(Caller::Anonymous);
            }
            _ => {}
        }
        let presented = auth
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(bearer)
            .ok_or(Refusal::Missing)?;
        if credential::looks_like(presented) {
            let node = self
                .cluster_secret
                .as_deref()
                .and_then(|s| credential::verify(s, presented))
                .ok_or(Refusal::Unknown)?;
            let allowed = match (need, node.role) {
                (Need::Edge, Role::Edge) => true,
                (Need::Scope(Scope::Read), Role::Edge) => path == LIST_NODES,
                // Peers forward Placement and Messaging calls, nothing else.
                (Need::Scope(Scope::Read | Scope::Messaging), Role::Coordinator) => {
                    path.starts_with(PLACEMENT) || path.starts_with(MESSAGING)
                }
                _ => false,
            };
            return if allowed {
                Ok(Caller::Node(node))
            } else {
                Err(Refusal::NodesOnly)
            };
        }
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        // Every key is compared, in constant time, so timing tells nothing about which.
        let key = self
            .keys
            .iter()
            .fold(None, |found, k| {
                if bool::from(k.digest.ct_eq(&digest)) {
                    Some(k)
                } else {
                    found
                }
            })
            .ok_or(Refusal::Unknown)?;
        match need {
            Need::Edge => Err(Refusal::NodesOnly),
            Need::Scope(s) if !key.allows(s) => Err(Refusal::Scope(s.as_str())),
            _ => Ok(Caller::Key(key.name.clone())),
        }
    }
}

const LIST_NODES: &str = "/switchboard.v1.Placement/ListNodes";
const PLACEMENT: &str = "/switchboard.v1.Placement/";
const MESSAGING: &str = "/switchboard.v1.Messaging/";

fn need(path: &str) -> Need {
    let (service, method) = path
        .strip_prefix('/')
        .and_then(|p| p.split_once('/'))
        .unwrap_or(("", ""));
    match service {
        "grpc.health.v1.Health" => Need::Health,
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            Need::Reflection
        }
        "switchboard.v1.EdgeReport" => Need::Edge,
        "switchboard.v1.Placement" => Need::Scope(Scope::Read),
        "switchboard.v1.Messaging" => Need::Scope(Scope::Messaging),
        "switchboard.v1.Resources" if matches!(method, "Get" | "List") => Need::Scope(Scope::Read),
        "switchboard.v1.Resources" => Need::Scope(Scope::Resources),
        // Admin, and any method this table does not know: the strongest scope.
        _ => Need::Scope(Scope::Admin),
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"cluster secret";

    fn access() -> Access {
        let keys = vec![
            ApiKey::new("reader".into(), b"k-read", vec![Scope::Read]),
            ApiKey::new("sender".into(), b"k-send", vec![Scope::Messaging]),
            ApiKey::new("ops".into(), b"k-admin", vec![Scope::Admin]),
        ];
        Access::new(
            &ApiConfig::default(),
            keys,
            Some(SECRET.to_vec()),
            false,
            false,
        )
    }

    fn check(a: &Access, path: &str, auth: &str) -> Result<Caller, Refusal> {
        a.check(path, (!auth.is_empty()).then_some(auth.as_bytes()))
    }

    #[test]
    fn keys_are_held_to_their_scopes() {
        let a = access();
        let send = "/switchboard.v1.Messaging/Send";
        assert_eq!(check(&a, send, ""), Err(Refusal::Missing));
        assert_eq!(check(&a, send, "Bearer nope"), Err(Refusal::Unknown));
        assert_eq!(check(&a, send, "Basic k-send"), Err(Refusal::Missing));
        assert_eq!(
            check(&a, send, "Bearer k-read"),
            Err(Refusal::Scope("messaging"))
        );
        assert_eq!(
            check(&a, send, "bearer  k-send "),
            Ok(Caller::Key("sender".into()))
        );
        assert_eq!(
            check(&a, send, "Bearer k-admin"),
            Ok(Caller::Key("ops".into()))
        );
        let get = "/switchboard.v1.Resources/Get";
        let put = "/switchboard.v1.Resources/Put";
        assert!(check(&a, get, "Bearer k-read").is_ok());
        assert_eq!(
            check(&a, put, "Bearer k-read"),
            Err(Refusal::Scope("resources"))
        );
        let revoke = "/switchboard.v1.Admin/Revoke";
        assert_eq!(
            check(&a, revoke, "Bearer k-send"),
            Err(Refusal::Scope("admin"))
        );
        assert!(check(&a, revoke, "Bearer k-admin").is_ok());
        assert_eq!(
            check(&a, "/x.Unknown/Call", "Bearer k-read"),
            Err(Refusal::Scope("admin"))
        );
    }

    #[test]
    fn health_and_reflection_are_open_unless_closed() {
        let a = access();
        assert_eq!(
            check(&a, "/grpc.health.v1.Health/Check", ""),
            Ok(Caller::Anonymous)
        );
        let reflect = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
        assert_eq!(check(&a, reflect, ""), Ok(Caller::Anonymous));
        let closed = ApiConfig {
            open_health: false,
            open_reflection: false,
            ..ApiConfig::default()
        };
        let keys = vec![ApiKey::new("r".into(), b"k", vec![Scope::Read])];
        let a = Access::new(&closed, keys, None, false, false);
        assert_eq!(
            check(&a, "/grpc.health.v1.Health/Check", ""),
            Err(Refusal::Missing)
        );
        assert!(check(&a, reflect, "Bearer k").is_ok());
    }

    #[test]
    fn only_edges_report_and_only_as_themselves() {
        let a = access();
        let report = "/switchboard.v1.EdgeReport/Report";
        let edge = credential::mint(SECRET, Role::Edge, "edge-1");
        let coord = credential::mint(SECRET, Role::Coordinator, "c-1");
        let forged = credential::mint(b"guess", Role::Edge, "edge-1");
        let caller = check(&a, report, &format!("Bearer {edge}")).unwrap();
        assert_eq!(
            caller,
            Caller::Node(credential::Node {
                role: Role::Edge,
                id: "edge-1".into()
            })
        );
        assert_eq!(
            check(&a, report, &format!("Bearer {forged}")),
            Err(Refusal::Unknown)
        );
        assert_eq!(
            check(&a, report, &format!("Bearer {coord}")),
            Err(Refusal::NodesOnly)
        );
        assert_eq!(check(&a, report, "Bearer k-admin"), Err(Refusal::NodesOnly));
        assert_eq!(check(&a, report, ""), Err(Refusal::Missing));
        // An edge may find the ring, nothing else.
        assert!(check(&a, LIST_NODES, &format!("Bearer {edge}")).is_ok());
        let locate = "/switchboard.v1.Placement/Locate";
        assert_eq!(
            check(&a, locate, &format!("Bearer {edge}")),
            Err(Refusal::NodesOnly)
        );
        // A peer coordinator forwards reads and messaging, never admin or resources.
        let c = check(
            &a,
            "/switchboard.v1.Messaging/Send",
            &format!("Bearer {coord}"),
        );
        assert!(c.unwrap().is_coordinator());
        let revoke = "/switchboard.v1.Admin/Revoke";
        assert_eq!(
            check(&a, revoke, &format!("Bearer {coord}")),
            Err(Refusal::NodesOnly)
        );
        let no_secret = Access::new(&ApiConfig::default(), Vec::new(), None, true, false);
        assert_eq!(check(&no_secret, report, ""), Err(Refusal::NoClusterSecret));
    }

    #[test]
    fn insecure_listeners_are_open_only_without_keys() {
        let open = Access::new(&ApiConfig::default(), Vec::new(), None, true, true);
        assert_eq!(
            check(&open, "/switchboard.v1.Messaging/Send", ""),
            Ok(Caller::Anonymous)
        );
        assert_eq!(
            check(&open, "/switchboard.v1.EdgeReport/Report", ""),
            Ok(Caller::Anonymous)
        );
        let keys = vec![ApiKey::new("r".into(), b"k", vec![Scope::Read])];
        let keyed = Access::new(&ApiConfig::default(), keys, None, true, false);
        assert_eq!(
            check(&keyed, "/switchboard.v1.Messaging/Send", ""),
            Err(Refusal::Missing)
        );
    }
}
