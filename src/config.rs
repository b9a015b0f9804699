//! The effective configuration: defaults < YAML file < `SWITCHBOARD_…` environment < flags,
//! validated once. Every mistake names its key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use coordinator::CoordinatorConfig;
use edge::EdgeConfig;
use edge::config::{AuthConfig, Hook, MessageHooks, RouteConfig};
use edge_core::Dialect;
use serde::{Deserialize, Serialize};
use serde_yaml_ng::Value;

/// Environment variables that override config keys: `SWITCHBOARD_EDGE__LISTEN` sets
/// `edge.listen` (`__` separates levels; names are lower-cased).
pub const ENV_PREFIX: &str = "SWITCHBOARD_";

/// The whole file.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This process's id in placement and on the bus. Default: `<mode>-<random>`.
    pub node_id: Option<String>,
    pub log: LogConfig,
    pub nats: NatsConfig,
    pub edge: EdgeConfig,
    pub coordinator: CoordinatorConfig,
    pub cluster: ClusterConfig,
    /// bodhi's `socket.yaml` block, as written (docs/PROTOCOL.md §9): becomes an edge route
    /// with its hooks, and the coordinators' send and broadcast subjects.
    pub gateway: Option<Gateway>,
}

/// What edges and coordinators share to talk to each other: the secret each derives its node
/// credential from (coordinators verify those credentials on report streams and peer calls),
/// and how to dial a coordinator over TLS.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// An environment variable holding the secret.
    pub secret_env: Option<String>,
    /// A file holding the secret (surrounding whitespace is ignored).
    pub secret_file: Option<PathBuf>,
    /// Run a cluster without a secret: anyone who reaches a coordinator can report as any
    /// edge. Only where the network is the boundary.
    pub insecure: bool,
    /// How edges and coordinators dial a coordinator's gRPC listener when it has
    /// `coordinator.tls`. Default: none (plaintext).
    pub tls: Option<ClusterTls>,
}

/// A secret read at load time; its `Debug` never shows it.
#[derive(Clone, Default)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Shortest secret accepted for API keys and the cluster secret.
const MIN_SECRET_LEN: usize = 16;

/// The client side of the coordinators' TLS: whom to trust and, for mutual TLS, who we are.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// PEM: the CA certificates a coordinator's certificate must chain to.
    pub ca_file: PathBuf,
    /// PEM: this process's client certificate chain (with `key_file`), for coordinators
    /// with a `client_ca_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM: the client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// The name checked on every coordinator's certificate instead of the host dialed (one
    /// certificate for all coordinators, dialed by IP address). Default: the host dialed.
    pub server_name: Option<String>,
}

/// bodhi's `gateway:` block.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    pub socket: BodhiSocket,
}

/// bodhi's `gateway.socket`: the keys of its document, plus `route` for what Switchboard
/// needs around them (auth, limits…).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BodhiSocket {
    pub path: String,
    #[serde(default)]
    pub onconnect: Option<Hook>,
    #[serde(default)]
    pub onmessage: Option<MessageHooks>,
    #[serde(default)]
    pub onclose: Option<Hook>,
    #[serde(default)]
    pub send: Option<Subscribe>,
    #[serde(default)]
    pub broadcast: Option<Subscribe>,
    /// The rest of the route. Default: bodhi's identity — a JWT in the `ID_TOKEN` cookie (or
    /// header, or `?token=`), the user from `preferred_username`, the HS256 secret from
    /// `SWITCHBOARD_JWT_SECRET`, the namespace from `?namespace=`.
    #[serde(default)]
    pub route: Option<RouteConfig>,
}

/// `{subscribe: <subject>}`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Subscribe {
    pub subscribe: String,
}

impl BodhiSocket {
    /// The edge route this block describes.
    pub fn to_route(&self) -> RouteConfig {
        let mut route = self.route.clone().unwrap_or_else(|| RouteConfig {
            auth: AuthConfig {
                hs256_secret_env: Some("SWITCHBOARD_JWT_SECRET".into()),
                user_claim: "preferred_username".into(),
                ..AuthConfig::default()
            },
            ..RouteConfig::default()
        });
        route.path.clone_from(&self.path);
        route.dialect = Dialect::named("bodhi").expect("bodhi is in the dialect table");
        route.hooks.onconnect.clone_from(&self.onconnect);
        route.hooks.onmessage.clone_from(&self.onmessage);
        route.hooks.onclose.clone_from(&self.onclose);
        route
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` or `json`. Default `pretty`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `edge=debug`; `RUST_LOG` wins. Default `info`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

pub use crate::nats::{NatsConfig, NatsTlsConfig};

/// Which process the config is for: a coordinator does not need a valid `edge` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Dev,
    Edge,
    Coordinator,
}

/// Flags that override config keys.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub grpc_listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub nats: Option<String>,
    pub coordinators: Option<Vec<String>>,
    pub node_id: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// A configuration mistake.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: {message}")]
    Key { key: String, message: String },
}

impl ConfigError {
    pub(crate) fn key(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Key {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Secrets and keys the config refers to, read at load time.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub config: Config,
    /// Key material per edge route (key files, JWKS file, JWKS CA).
    pub route_keys: Vec<edge::RouteKeys>,
    /// The cluster secret (`cluster.secret_env` / `secret_file`).
    pub cluster_secret: Option<Secret>,
    /// The coordinator's API keys, secrets read (`coordinator.api.keys`).
    pub api_keys: Vec<coordinator::access::ApiKey>,
    /// The NATS URLs without credentials, and the credentials and TLS files `nats:` names.
    pub nats: crate::nats::NatsAccess,
    /// The TLS configs of the blocks this mode uses, read and kept current.
    pub tls: crate::tls::Tls,
}

impl Config {
    /// Loads `file` (if any), applies `env` overrides and `flags`, validates, and reads the
    /// files and variables the config names. `base` gives the mode's defaults.
    pub fn load(
        mode: Mode,
        base: &Config,
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> Result<Resolved, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut tree = serde_yaml_ng::to_value(base)
            .map_err(|e| ConfigError::key("(defaults)", e.to_string()))?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let doc: Value = serde_yaml_ng::from_str(&text)
                .map_err(|e| ConfigError::key("(file)", e.to_string()))?;
            if !doc.is_null() {
                merge(&mut tree, doc);
            }
        }
        for (name, value) in &env {
            let Some(path) = name.strip_prefix(ENV_PREFIX).filter(|p| p.contains("__")) else {
                continue;
            };
            let keys: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
            let parsed: Value =
                serde_yaml_ng::from_str(value).unwrap_or_else(|_| Value::String(value.clone()));
            set(&mut tree, &keys, parsed).map_err(|m| ConfigError::key(name.clone(), m))?;
        }
        let mut config: Config = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::key(
                if key == "." { "(root)".into() } else { key },
                e.into_inner().to_string(),
            )
        })?;
        if let Some(a) = flags.listen {
            config.edge.listen = a;
        }
        if let Some(a) = flags.grpc_listen {
            config.coordinator.grpc_listen = a;
        }
        if let Some(a) = flags.http_listen {
            config.coordinator.http_listen = a;
        }
        if let Some(url) = &flags.nats {
            config.nats.url.clone_from(url);
        }
        if let Some(list) = &flags.coordinators {
            config.edge.coordinators.clone_from(list);
        }

        if let Some(id) = &flags.node_id {
            config.node_id = Some(id.clone());
        }
        if let Some(f) = flags.log_format {
            config.log.format = f;
        }
        if let Some(gw) = &config.gateway {
            let route = gw.socket.to_route();
            match config.edge.routes.iter_mut().find(|r| r.path == route.path) {
                Some(slot) => *slot = route,
                None => config.edge.routes.push(route),
            }
            if let Some(s) = &gw.socket.send {
                config.coordinator.send_subject.clone_from(&s.subscribe);
            }
            if let Some(b) = &gw.socket.broadcast {
                config
                    .coordinator
                    .broadcast_subject
                    .clone_from(&b.subscribe);
            }
        }
        if mode != Mode::Coordinator {
            config
                .edge
                .validate()
                .map_err(|e| ConfigError::key(e.key, e.message))?;
        }
        if mode != Mode::Dev && config.nats.url.is_empty() {
            return Err(ConfigError::key(
                "nats.url",
                "cluster mode needs NATS: set --nats",
            ));
        }
        let nats = config.nats.resolve(&env)?;

        if config
            .node_id
            .as_deref()
            .is_some_and(|id| id.is_empty() || id.contains(char::is_whitespace))
        {
            return Err(ConfigError::key(
                "node_id",
                "must be non-empty, without spaces",
            ));
        }
        let mut route_keys = Vec::new();
        // A coordinator reads the edge block only for resource types: no secrets or keys.
        let edge_routes = if mode == Mode::Coordinator {
            &mut [][..]
        } else {
            &mut config.edge.routes[..]
        };
        for (i, route) in edge_routes.iter_mut().enumerate() {
            let key = |k: &str| format!("edge.routes[{i}].auth.{k}");
            if let Some(var) = &route.auth.hs256_secret_env {
                let secret = env.iter().find(|(n, _)| n == var).map(|(_, v)| v.clone());
                match secret {
                    Some(s) if !s.is_empty() => route.auth.hs256_secret = Some(s),
                    _ => {
                        return Err(ConfigError::key(
                            key("hs256_secret_env"),
                            format!("environment variable {var} is not set"),
                        ));
                    }
                }
            }
            let a = &route.auth;
            let read = |name: &str, path: &Option<PathBuf>| match path {
                Some(path) => std::fs::read(path).map(Some).map_err(|e| {
                    ConfigError::key(key(name), format!("cannot read {}: {e}", path.display()))
                }),
                None => Ok(None),
            };
            let pem = [
                ("rs256_public_key_file", &a.rs256_public_key_file),
                ("es256_public_key_file", &a.es256_public_key_file),
                ("eddsa_public_key_file", &a.eddsa_public_key_file),
            ]
            .into_iter()
            .find(|(_, p)| p.is_some())
            .map(|(name, p)| read(name, p))
            .transpose()?
            .flatten();
            route_keys.push(edge::RouteKeys {
                pem,
                jwks: read("jwks_file", &a.jwks_file)?,
                jwks_ca: read("jwks_ca_file", &a.jwks_ca_file)?,
                resume: None,
            });
        }
        let cluster_secret = resolve_cluster(mode, &config, &env)?;
        // Every edge of a cluster takes the resume tokens another made; without a cluster
        // secret (one process) a key of this process's own does, until it restarts.
        let resume = match &cluster_secret {
            Some(secret) => proto::resume::key(secret.expose()),
            None => proto::resume::key(&rand::random::<[u8; 32]>()),
        };
        for keys in &mut route_keys {
            keys.resume = Some(resume.clone());
        }
        let api_keys = resolve_api_keys(mode, &config, cluster_secret.is_some(), &env)?;
        let tls = crate::tls::Tls::load(mode, &config)?;
        Ok(Resolved {
            config,
            route_keys,
            cluster_secret,
            api_keys,
            nats,
            tls,
        })
    }

    /// The effective config as YAML, secrets redacted.
    pub fn to_yaml(&self) -> String {
        let mut shown = self.clone();
        for r in &mut shown.edge.routes {
            r.namespace.precedence = Some(r.namespace.order());
            redact(&mut r.auth);
        }
        // bodhi's block as written, whose route became one of the above.
        if let Some(route) = shown.gateway.as_mut().and_then(|g| g.socket.route.as_mut()) {
            redact(&mut route.auth);
        }

        serde_yaml_ng::to_string(&shown).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

/// Reads a secret from the variable or the file a config names (exactly one of them).
fn read_secret(
    key: &str,
    var: Option<&String>,
    file: Option<&PathBuf>,
    env: &[(String, String)],
) -> Result<Option<Secret>, ConfigError> {
    let text = match (var, file) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(ConfigError::key(
                key,
                "set secret_env or secret_file, not both",
            ));
        }
        (Some(var), None) => env
            .iter()
            .find(|(n, _)| n == var)
            .map(|(_, v)| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ConfigError::key(
                    format!("{key}.secret_env"),
                    format!("environment variable {var} is not set"),
                )
            })?,
        (None, Some(path)) => std::fs::read_to_string(path)
            .map_err(|e| {
                ConfigError::key(
                    format!("{key}.secret_file"),
                    format!("cannot read {}: {e}", path.display()),
                )
            })?
            .trim()
            .to_owned(),
    };
    if text.len() < MIN_SECRET_LEN {
        return Err(ConfigError::key(
            key,
            format!(
                "the secret is shorter than {MIN_SECRET_LEN} characters; `switchboard api-key` prints a strong one"
            ),
        ));
    }
    Ok(Some(Secret(text.into_bytes())))
}

/// The cluster secret; edges and coordinators need one unless `cluster.insecure` is set.
fn resolve_cluster(
    mode: Mode,
    config: &Config,
    env: &[(String, String)],
) -> Result<Option<Secret>, ConfigError> {
    let c = &config.cluster;
    let secret = read_secret(
        "cluster",
        c.secret_env.as_ref(),
        c.secret_file.as_ref(),
        env,
    )?;
    if c.insecure && secret.is_some() {
        return Err(ConfigError::key(
            "cluster.insecure",
            "contradicts the secret set beside it: remove one",
        ));
    }
    if mode != Mode::Dev && secret.is_none() && !c.insecure {
        return Err(ConfigError::key(
            "cluster",
            "set secret_env or secret_file (the same secret on every edge and coordinator), \
             or insecure: true to let anyone who reaches a coordinator report as any edge",
        ));
    }
    Ok(secret)
}

/// The coordinator's API keys; outside `dev` a coordinator needs at least one unless
/// `coordinator.api.insecure` is set.
fn resolve_api_keys(
    mode: Mode,
    config: &Config,
    has_cluster_secret: bool,
    env: &[(String, String)],
) -> Result<Vec<coordinator::access::ApiKey>, ConfigError> {
    let api = &config.coordinator.api;
    if mode == Mode::Edge {
        return Ok(Vec::new());
    }
    let mut names = std::collections::HashSet::new();
    let mut keys = Vec::new();
    for (i, k) in api.keys.iter().enumerate() {
        let key = format!("coordinator.api.keys[{i}]");
        if k.name.is_empty() || !names.insert(k.name.as_str()) {
            return Err(ConfigError::key(
                format!("{key}.name"),
                "needs a name no other key has",
            ));
        }
        if k.scopes.is_empty() {
            return Err(ConfigError::key(
                format!("{key}.scopes"),
                "list at least one of read, messaging, resources, admin",
            ));
        }
        let secret = read_secret(&key, k.secret_env.as_ref(), k.secret_file.as_ref(), env)?
            .ok_or_else(|| ConfigError::key(&key, "set secret_env or secret_file"))?;
        keys.push(coordinator::access::ApiKey::new(
            k.name.clone(),
            secret.expose(),
            k.scopes.clone(),
        ));
    }
    if api.insecure && !keys.is_empty() {
        return Err(ConfigError::key(
            "coordinator.api.insecure",
            "contradicts the keys configured beside it: remove one",
        ));
    }
    if mode == Mode::Coordinator && keys.is_empty() && !api.insecure {
        return Err(ConfigError::key(
            "coordinator.api.keys",
            "a coordinator serves gRPC only to callers with a key: add one \
             (`switchboard api-key` prints a fresh one), or set coordinator.api.insecure: true",
        ));
    }
    if mode == Mode::Coordinator && !keys.is_empty() && !has_cluster_secret {
        return Err(ConfigError::key(
            "cluster",
            "coordinators with API keys authenticate to each other with the cluster secret: \
             set cluster.secret_env or cluster.secret_file",
        ));
    }
    Ok(keys)
}

/// Shows where a route's HS256 secret comes from, never the secret.
fn redact(auth: &mut AuthConfig) {
    if auth.hs256_secret_env.is_some() {
        // The secret came from the variable.
        auth.hs256_secret = None;
    } else if auth.hs256_secret.is_some() {
        auth.hs256_secret = Some("<redacted>".into());
    }
}

/// Deep-merges `over` into `base`: mappings merge key by key, anything else replaces.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

fn set(tree: &mut Value, keys: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = keys.split_first() else {
        return Ok(());
    };
    if tree.is_null() {
        // An optional block that is off (e.g. `edge.tls`) is switched on by its keys.
        *tree = Value::Mapping(Default::default());
    }
    let Value::Mapping(map) = tree else {
        return Err(format!("{first}: parent is not a mapping"));
    };
    let k = Value::String(first.clone());
    if rest.is_empty() {
        map.insert(k, value);
        return Ok(());
    }
    let child = map
        .entry(k)
        .or_insert_with(|| Value::Mapping(Default::default()));
    set(child, rest, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Resolved, ConfigError> {
        let dir = std::env::temp_dir().join(format!("sb-config-{}", ulid_like()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let env = env.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned()));
        let r = Config::load(
            Mode::Dev,
            &Config::default(),
            Some(&path),
            env,
            &Overrides::default(),
        );
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    fn ulid_like() -> String {
        format!("{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], "")
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = load(
            "edge:\n  routes:\n    - path: /x\n      anonymous: true\n      bogus: 1\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().starts_with("edge.routes[0]"), "{e}");
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn bad_durations_and_contradictions_are_named() {
        let e = load("edge:\n  drain_window: soon\n", &[]).unwrap_err();
        assert!(e.to_string().starts_with("edge.drain_window"), "{e}");
        let e = load("edge:\n  routes:\n    - path: /x\n", &[]).unwrap_err();
        assert!(e.to_string().starts_with("edge.routes[0].auth"), "{e}");
        let e = load(
            "edge:\n  routes:\n    - path: /x\n      auth: { hs256_secret_env: NOPE_X }\n",
            &[],
        )
        .unwrap_err();
        assert!(e.to_string().contains("NOPE_X is not set"), "{e}");
    }

    #[test]
    fn token_lifecycle_mistakes_are_named() {
        let route = |auth: &str| format!("edge:\n  routes:\n    - path: /x\n      auth: {auth}\n");
        let e = load(
            &route("{ hs256_secret: s, es256_public_key_file: /k.pem }"),
            &[],
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "edge.routes[0].auth: set only one key source, not hs256_secret and es256_public_key_file"
        );
        let e = load(&route("{ hs256_secret: s, refresh_lead: 2h }"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("edge.routes[0].auth.refresh_lead: must be less"),
            "{e}"
        );
        let e = load(&route("{ jwks_url: \"http://idp.example.com/k\" }"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("edge.routes[0].auth.jwks_url: must start with https://"),
            "{e}"
        );
        let e = load(
            &route("{ jwks_url: \"https://idp.example.com/k\", jwks_refresh_min: 0s }"),
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("edge.routes[0].auth.jwks_refresh_min"),
            "{e}"
        );
        let e = load(&route("{ eddsa_public_key_file: /nope/ed.pem }"), &[]).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("edge.routes[0].auth.eddsa_public_key_file: cannot read"),
            "{e}"
        );
        let r = load(
            &route("{ hs256_secret: s, require_exp: false, refresh_lead: 5s }"),
            &[],
        )
        .unwrap();
        assert!(!r.config.edge.routes[0].auth.require_exp);
    }

    #[test]
    fn env_overrides_file() {
        let r = load(
            "edge:\n  listen: 127.0.0.1:1\n  routes: [{ path: /x, anonymous: true }]\n",
            &[("SWITCHBOARD_EDGE__LISTEN", "127.0.0.1:2")],
        )
        .unwrap();
        assert_eq!(r.config.edge.listen.port(), 2);
        let r = load(
            "edge:\n  routes:\n    - path: /x\n      auth: { hs256_secret_env: SWITCHBOARD_JWT_SECRET }\n",
            &[("SWITCHBOARD_JWT_SECRET", "s3cret")],
        )
        .unwrap();
        assert_eq!(
            r.config.edge.routes[0].auth.hs256_secret.as_deref(),
            Some("s3cret")
        );
        assert!(!r.config.to_yaml().contains("s3cret"));
    }

    #[test]
    fn contradictions_are_refused_naming_the_key() {
        let route = |extra: &str| {
            format!("edge:\n  routes:\n    - path: /x\n      auth: {{ hs256_secret: s }}\n{extra}")
        };
        let cases = [
            ("      anonymous: true\n", "edge.routes[0].anonymous"),
            (
                "      heartbeat: { interval: 5s, timeout: 10s }\n",
                "edge.routes[0].heartbeat.timeout",
            ),
            (
                "      rate_limit: { per_second: 100, burst: 50 }\n",
                "edge.routes[0].rate_limit.burst",
            ),
            (
                "      rate_limit: { close_after: 0 }\n",
                "edge.routes[0].rate_limit.close_after",
            ),
            (
                "      namespace: { query: token }\n",
                "edge.routes[0].namespace.query",
            ),
            (
                "      namespace: { default: \"\" }\n",
                "edge.routes[0].namespace.default",
            ),
            (
                "      namespace: { claim: tenant, precedence: \"query:namespace > default:default\" }\n",
                "edge.routes[0].namespace.precedence",
            ),
            (
                "      public_origins: [ws.example.com]\n",
                "edge.routes[0].public_origins",
            ),
        ];
        for (extra, key) in cases {
            let e = load(&route(extra), &[]).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!("{key}:")),
                "{extra}: {e}"
            );
        }
        // A claim on an anonymous route: there is no token to take it from.
        let e = load(
            "edge:\n  routes:\n    - path: /x\n      anonymous: true\n      namespace: { claim: tenant }\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("edge.routes[0].namespace.claim:"),
            "{e}"
        );
        // The limits' edges are fine.
        load(
            &route("      heartbeat: { interval: 10s, timeout: 10s }\n      rate_limit: { per_second: 10, burst: 10, close_after: 1 }\n"),
            &[],
        )
        .unwrap();
    }

    #[test]
    fn the_effective_config_states_the_namespace_precedence() {
        let r = load(
            "edge:\n  routes:\n    - path: /x\n      auth: { hs256_secret: s }\n      namespace: { claim: tenant }\n",
            &[],
        )
        .unwrap();
        let yaml = r.config.to_yaml();
        assert!(
            yaml.contains("precedence: claim:tenant (required)"),
            "{yaml}"
        );
        // What check-config prints loads again.
        load(&yaml, &[]).unwrap();
    }
}
