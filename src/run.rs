//! Wiring a mode together: build the bus, the edge and the coordinator from the config, bind,
//! serve, and drain on the first signal.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use std::collections::BTreeMap;

use bus::local_store::LocalStore;
use bus::nats_store::{NatsStore, NatsStoreOptions};
use bus::{
    LocalBus, LocalHistory, NatsBus, NatsHistory, NatsHistoryOptions, SharedBus, SharedHistory,
    SharedStore,
};
use coordinator::Coordinator;
use coordinator::access::Access;
use coordinator::admin::AdminService;
use coordinator::resources::{ResourceSpec, ResourcesService};
use edge::config::{ResourceKind, RouteConfig};
use edge::{Edge, Stores};
use proto::subject;
use proto::v1::ReportBatch;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Resolved};
use crate::nats::NatsAccess;
use crate::token::RouteToken;

/// Queue length of each in-process bus subscription.
const LOCAL_BUS_QUEUE: usize = 65_536;
/// Changes buffered per in-process store watcher before it must re-list.
const LOCAL_WATCH_QUEUE: usize = 4096;
/// How long the gRPC server may take to finish in-flight calls after shutdown.
const GRPC_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Cluster mode: one edge over NATS, reporting to the coordinators.
pub async fn edge(resolved: Resolved, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = resolved.config;
    let tls = resolved.tls;
    tls.spawn_reloader(shutdown.clone())?;
    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(|| format!("edge-{}", ulid::Ulid::new()));
    let (bus, client) = connect_nats(&resolved.nats, &node_id, subject::EDGE_INBOX).await?;
    let revocations = revocation_store(&client);
    let history = NatsHistory::new(client.clone(), NatsHistoryOptions::default());
    let history = history_store(&cfg, Arc::new(history)).await?;
    let store: SharedStore = Arc::new(NatsStore::new(client, NatsStoreOptions::default()));
    let edge = Edge::new(
        node_id.clone(),
        cfg.edge.clone(),
        &resolved.route_keys,
        Arc::clone(&bus),
        Stores {
            resources: Some(store),
            revocations: Some(revocations),
            history,
        },
    )?;
    let ws = TcpListener::bind(cfg.edge.listen)
        .await
        .with_context(|| format!("cannot listen on {} (edge.listen)", cfg.edge.listen))?;
    let address = match &cfg.edge.advertise {
        Some(a) => a.clone(),
        None => ws.local_addr()?.to_string(),
    };
    let scheme = if tls.edge.is_some() { "wss" } else { "ws" };
    println!(
        "switchboard edge {node_id}: websocket {scheme}://{address} (nats {})",
        cfg.nats.url
    );
    tracing::info!(node = %node_id, websocket = %address, nats = %cfg.nats.url, coordinators = ?cfg.edge.coordinators, "edge serving");
    let credential = resolved
        .cluster_secret
        .as_ref()
        .map(|s| proto::credential::mint(s.expose(), proto::credential::Role::Edge, &node_id));
    let options = edge::uplink::UplinkOptions {
        seeds: cfg.edge.coordinators.clone(),
        member_timeout: cfg.edge.member_timeout,
        address,
        credential,
        dialer: tls.dialer.clone(),
    };
    let stop_uplink = CancellationToken::new();
    let uplink = tokio::spawn(edge::uplink::run(
        edge.clone(),
        bus,
        options,
        stop_uplink.clone(),
    ));
    match tls.edge {
        Some(server) => edge.serve_tls(ws, server, shutdown).await?,
        None => edge.serve(ws, shutdown).await?,
    }
    stop_uplink.cancel();
    let _ = uplink.await;
    Ok(())
}

/// Cluster mode: one coordinator over NATS.
pub async fn coordinator(resolved: Resolved, shutdown: CancellationToken) -> anyhow::Result<()> {
    let cfg = resolved.config;
    let tls = resolved.tls;
    tls.spawn_reloader(shutdown.clone())?;
    let cc = &cfg.coordinator;
    let node_id = cfg
        .node_id
        .clone()
        .unwrap_or_else(|| format!("coordinator-{}", ulid::Ulid::new()));
    let (bus, client) = connect_nats(&resolved.nats, &node_id, subject::COORDINATOR_INBOX).await?;
    let admin = AdminService::new(revocation_store(&client), cc.revocation_bucket.clone());
    let history: SharedHistory = Arc::new(NatsHistory::new(
        client.clone(),
        NatsHistoryOptions::default(),
    ));
    let store: SharedStore = Arc::new(NatsStore::new(client, NatsStoreOptions::default()));
    let resources = ResourcesService::new(store, resource_specs(&cfg));
    let grpc = TcpListener::bind(cc.grpc_listen).await.with_context(|| {
        format!(
            "cannot listen on {} (coordinator.grpc_listen)",
            cc.grpc_listen
        )
    })?;
    let http = TcpListener::bind(cc.http_listen).await.with_context(|| {
        format!(
            "cannot listen on {} (coordinator.http_listen)",
            cc.http_listen
        )
    })?;
    let grpc_addr = grpc.local_addr()?;
    let advertise = cc
        .advertise
        .clone()
        .unwrap_or_else(|| grpc_addr.to_string());
    let mut c = Coordinator::new(node_id.clone(), advertise.clone(), bus, cc).with_history(history);
    c.cluster().set_dialer(tls.dialer.clone());
    if let Some(secret) = &resolved.cluster_secret {
        c = c.with_cluster_secret(secret.expose());
    }
    let access = access(
        &cfg,
        resolved.api_keys,
        resolved.cluster_secret.as_ref(),
        cc.api.insecure,
    );
    // Before any call is answered: the edges already on the bus, which will report to this
    // coordinator only after their reconnect backoff, are joining here, not absent.
    c.census().await;
    c.refresh_history().await;
    println!(
        "switchboard coordinator {node_id}: grpc {grpc_addr}{} http http://{} (nats {})",
        if tls.grpc.is_some() { " (tls)" } else { "" },
        http.local_addr()?,
        cfg.nats.url
    );
    tracing::info!(node = %node_id, grpc = %grpc_addr, %advertise, http = %http.local_addr()?, nats = %cfg.nats.url, "coordinator serving");
    if cc.tls.is_some() && cfg.cluster.tls.is_none() {
        tracing::warn!(
            "coordinator.tls is set but cluster.tls is not: this coordinator dials its peers in plaintext, which they refuse"
        );
    }
    let tasks = [
        tokio::spawn(coordinator::cluster::run_membership(
            c.shared_cluster(),
            c.bus(),
            c.epoch(),
            cc.announce_interval,
            shutdown.clone(),
        )),
        tokio::spawn(coordinator::report::run_reaper(
            c.clone(),
            cc.edge_grace,
            shutdown.clone(),
        )),
        tokio::spawn(coordinator::report::run_census(c.clone(), shutdown.clone())),
        tokio::spawn(coordinator::report::run_history_rules(
            c.clone(),
            shutdown.clone(),
        )),
        tokio::spawn(coordinator::ingest::run(
            c.clone(),
            cc.send_subject.clone(),
            cc.broadcast_subject.clone(),
            shutdown.clone(),
        )),
        tokio::spawn({
            let (c, shutdown) = (c.clone(), shutdown.clone());
            async move {
                if let Err(error) = coordinator::http::serve(http, c, shutdown).await {
                    tracing::error!(%error, "http listener failed");
                }
            }
        }),
    ];
    let server = tokio::spawn(coordinator::grpc::serve(
        grpc,
        tls.grpc.clone(),
        access,
        c,
        resources,
        admin,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    // Report streams from edges are long-lived: give in-flight calls a bounded grace.
    match tokio::time::timeout(GRPC_GRACE, server).await {
        Ok(r) => r?.context("grpc server failed")?,
        Err(_) => tracing::warn!("grpc calls still open after the grace period; exiting"),
    }
    for t in tasks {
        let _ = tokio::time::timeout(GRPC_GRACE, t).await;
    }
    Ok(())
}

/// The gRPC access policy: API keys and the cluster secret; `open_api` serves the key-scoped
/// methods to anyone when no key is configured.
fn access(
    cfg: &Config,
    keys: Vec<coordinator::access::ApiKey>,
    secret: Option<&crate::config::Secret>,
    open_api: bool,
) -> Arc<Access> {
    if keys.is_empty() && open_api {
        tracing::warn!(
            "grpc without API keys: anyone who reaches this port can send, disconnect and read placement"
        );
    }
    Arc::new(Access::new(
        &cfg.coordinator.api,
        keys,
        secret.map(|s| s.expose().to_vec()),
        open_api,
        cfg.cluster.insecure,
    ))
}

/// Where `Resources` finds each resource type: the coordinator's own list, then the edge
/// routes' key-value resource types in the same file.
fn resource_specs(cfg: &Config) -> BTreeMap<String, ResourceSpec> {
    let mut specs = BTreeMap::new();
    for route in &cfg.edge.routes {
        for (name, r) in route
            .resources
            .iter()
            .filter(|(_, r)| r.kind == ResourceKind::Kv)
        {
            let spec = ResourceSpec {
                bucket: r.bucket_name(name),
                id_field: r.id_field.clone(),
            };
            specs.insert(name.clone(), spec);
        }
    }
    for (name, r) in &cfg.coordinator.resources {
        let spec = ResourceSpec {
            bucket: r.bucket.clone().unwrap_or_else(|| name.clone()),
            id_field: r.id_field.clone().unwrap_or_else(|| "id".into()),
        };
        specs.insert(name.clone(), spec);
    }
    specs
}

/// The store of the revocation bucket: JetStream KV whose entries the server drops after
/// the longest revocation (so the bucket's size is bounded).
fn revocation_store(client: &async_nats::Client) -> SharedStore {
    let opts = NatsStoreOptions {
        max_age: std::time::Duration::from_secs(proto::revoke::MAX_TTL_SECS),
        ..NatsStoreOptions::default()
    };
    Arc::new(NatsStore::new(client.clone(), opts))
}

/// The bus, and the raw client for JetStream.
async fn connect_nats(
    nats: &NatsAccess,
    node_id: &str,
    inbox_prefix: &str,
) -> anyhow::Result<(SharedBus, async_nats::Client)> {
    let bus = NatsBus::connect(nats.options(node_id, inbox_prefix))
        .await
        .map_err(|e| anyhow::anyhow!(nats.explain(&e)))?;
    let client = bus.client().clone();
    Ok((Arc::new(bus), client))
}

/// The embedded mode: one edge and one coordinator in one process, over the in-process bus or,
/// with `nats.url`, over NATS as in cluster mode (so that backends in other processes can
/// answer hooks and call `sb.send`), bound and ready to serve.
#[derive(Debug)]
pub struct DevNode {
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    edge: Edge,
    coordinator: Coordinator,
    /// The edge's bus (over NATS, the coordinator has a connection of its own).
    bus: SharedBus,
    /// The NATS URLs (credentials redacted), or `None` for the in-process bus.
    nats: Option<String>,
    resources: ResourcesService,
    admin: AdminService,
    ws: TcpListener,
    grpc: TcpListener,
    access: Arc<Access>,
    cfg: Config,
    tls: crate::tls::Tls,
    /// Stops the certificate reloader, which runs from `bind` on (SIGHUP reloads from then).
    stop_reload: CancellationToken,
}

impl DevNode {
    pub async fn bind(resolved: Resolved) -> anyhow::Result<Self> {
        let cfg = resolved.config;
        let tls = resolved.tls;
        let stop_reload = CancellationToken::new();
        tls.spawn_reloader(stop_reload.clone())?;
        let node_id = cfg
            .node_id
            .clone()
            .unwrap_or_else(|| format!("dev-{}", ulid::Ulid::new()));
        let buses = if resolved.nats.url.is_empty() {
            DevBuses::local()
        } else {
            DevBuses::nats(&resolved.nats, &node_id).await?
        };
        let resources = ResourcesService::new(buses.coordinator_store, resource_specs(&cfg));
        let admin = AdminService::new(
            buses.coordinator_revocations,
            cfg.coordinator.revocation_bucket.clone(),
        );
        let history = history_store(&cfg, Arc::clone(&buses.history)).await?;
        let edge = Edge::new(
            node_id,
            cfg.edge.clone(),
            &resolved.route_keys,
            Arc::clone(&buses.edge),
            Stores {
                resources: Some(buses.edge_store),
                revocations: Some(buses.edge_revocations),
                history,
            },
        )?;
        edge.set_pages(crate::demo::PAGES);
        let ws = TcpListener::bind(cfg.edge.listen)
            .await
            .with_context(|| format!("cannot listen on {} (edge.listen)", cfg.edge.listen))?;
        let grpc = TcpListener::bind(cfg.coordinator.grpc_listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (coordinator.grpc_listen)",
                    cfg.coordinator.grpc_listen
                )
            })?;
        let (ws_addr, grpc_addr) = (ws.local_addr()?, grpc.local_addr()?);
        let advertise = cfg
            .coordinator
            .advertise
            .clone()
            .unwrap_or_else(|| grpc_addr.to_string());
        let coordinator = Coordinator::new(
            edge.node_id().to_owned(),
            advertise,
            buses.coordinator,
            &cfg.coordinator,
        )
        .with_history(buses.history);
        coordinator.refresh_history().await;
        // The embedded mode serves gRPC without keys unless some are configured.
        let access = access(
            &cfg,
            resolved.api_keys,
            resolved.cluster_secret.as_ref(),
            true,
        );
        Ok(Self {
            ws_addr,
            grpc_addr,
            edge,
            coordinator,
            bus: buses.edge,
            nats: (!resolved.nats.url.is_empty()).then(|| cfg.nats.url.clone()),
            resources,
            admin,
            ws,
            grpc,
            access,
            cfg,
            tls,
            stop_reload,
        })
    }

    /// The edge's bus, for backends living in the same process (and tests playing one).
    pub fn bus(&self) -> SharedBus {
        Arc::clone(&self.bus)
    }

    /// What a person starting `switchboard dev` needs to know: which bus, and a client URL
    /// that works as printed for each route (a token minted now for an HS256 route; for a
    /// route that only has a public key, the command that mints one with the private key).
    pub fn banner(&self) -> String {
        let (ws, grpc) = (self.ws_addr, self.grpc_addr);
        let (ws_scheme, http_scheme) = if self.tls.edge.is_some() {
            ("wss", "https")
        } else {
            ("ws", "http")
        };
        let grpcurl = match &self.cfg.coordinator.tls {
            None => "-plaintext",
            Some(t) if t.client_ca_file.is_some() => "-cacert CA.pem -cert CERT -key KEY",
            Some(_) => "-cacert CA.pem",
        };
        let bus = match &self.nats {
            Some(url) => {
                format!("NATS at {url} (embedded mode: backends answer hooks and send over it)")
            }
            None => "in-process bus (embedded mode; --nats URL for backends on NATS)".to_owned(),
        };
        let mut out = format!("switchboard dev: one process, {bus}\n");
        let mut first = None;
        for route in &self.cfg.edge.routes {
            let hint = client_hint(route, &format!("{ws_scheme}://{ws}"));
            out.push_str(&format!("  websocket  {}{}\n", hint.url, hint.note));
            if let Some(command) = &hint.command {
                out.push_str(&format!("  token      TOKEN=$({command})\n"));
            }
            first.get_or_insert(hint);
        }
        out.push_str(&format!(
            "  grpc       {grpc}   (grpcurl {grpcurl} {grpc} list)\n\
             \x20 health     {http_scheme}://{ws}/readyz   metrics: {http_scheme}://{ws}/metrics\n\
             \x20 demo       {http_scheme}://{ws}/   (a chat and a watch in the browser, with clients/js)\n"
        ));
        if let Some(hint) = first {
            // `$TOKEN` must expand: double quotes then.
            let q = if hint.command.is_some() { '"' } else { '\'' };
            let header = hint
                .header
                .map(|h| format!("-H {q}{h}{q} "))
                .unwrap_or_default();
            out.push_str(&format!(
                "  try        websocat {header}{q}{}{q}  then send {{\"type\":\"subscribe\",\"topic\":\"chat/+\"}}\n",
                hint.url
            ));
        }
        out
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        for r in self.cfg.edge.routes.iter().filter(|r| r.anonymous) {
            tracing::warn!(route = %r.path, "anonymous route: anyone can connect as any user; not for production");
        }
        let bus = self.nats.as_deref().unwrap_or("in-process");
        tracing::info!(websocket = %self.ws_addr, grpc = %self.grpc_addr, node = self.edge.node_id(), bus, "serving");
        let address = self.ws_addr.to_string();
        let stop_feed = CancellationToken::new();
        let reports = tokio::spawn(feed_directory(
            self.edge.clone(),
            self.coordinator.clone(),
            address,
            stop_feed.clone(),
        ));
        let grpc_stop = CancellationToken::new();
        // Backends with only a NATS client send and broadcast on the bus, as in cluster mode.
        let ingest = tokio::spawn(coordinator::ingest::run(
            self.coordinator.clone(),
            self.cfg.coordinator.send_subject.clone(),
            self.cfg.coordinator.broadcast_subject.clone(),
            grpc_stop.clone(),
        ));
        let grpc_task = tokio::spawn(coordinator::grpc::serve(
            self.grpc,
            self.tls.grpc.clone(),
            self.access,
            self.coordinator,
            self.resources,
            self.admin,
            grpc_stop.clone(),
        ));
        match self.tls.edge.clone() {
            Some(server) => self.edge.serve_tls(self.ws, server, shutdown).await?,
            None => self.edge.serve(self.ws, shutdown).await?,
        }
        grpc_stop.cancel();
        stop_feed.cancel();
        self.stop_reload.cancel();
        grpc_task.await?.context("grpc server failed")?;
        let _ = reports.await;
        let _ = ingest.await;
        Ok(())
    }
}

/// The buses and stores of the embedded mode: all one in-process bus and store, or NATS
/// connections as in cluster mode (one per role, each with its role's inbox prefix, so that
/// the server sees an edge and a coordinator and the same permissions apply).
struct DevBuses {
    edge: SharedBus,
    edge_store: SharedStore,
    edge_revocations: SharedStore,
    coordinator: SharedBus,
    coordinator_store: SharedStore,
    coordinator_revocations: SharedStore,
    /// One history for both: the in-process rings, or JetStream.
    history: SharedHistory,
}

impl DevBuses {
    fn local() -> Self {
        let bus: SharedBus = Arc::new(LocalBus::new(LOCAL_BUS_QUEUE));
        let store: SharedStore = Arc::new(LocalStore::new(LOCAL_WATCH_QUEUE));
        Self {
            history: Arc::new(LocalHistory::new(Arc::clone(&bus))),
            edge: Arc::clone(&bus),
            edge_store: Arc::clone(&store),
            edge_revocations: Arc::clone(&store),
            coordinator: bus,
            coordinator_store: Arc::clone(&store),
            coordinator_revocations: store,
        }
    }

    async fn nats(nats: &NatsAccess, node_id: &str) -> anyhow::Result<Self> {
        let (edge, edge_client) = connect_nats(nats, node_id, subject::EDGE_INBOX).await?;
        let (coordinator, coordinator_client) =
            connect_nats(nats, node_id, subject::COORDINATOR_INBOX).await?;
        Ok(Self {
            edge,
            history: Arc::new(NatsHistory::new(
                edge_client.clone(),
                NatsHistoryOptions::default(),
            )),
            edge_revocations: revocation_store(&edge_client),
            edge_store: Arc::new(NatsStore::new(edge_client, NatsStoreOptions::default())),
            coordinator,
            coordinator_revocations: revocation_store(&coordinator_client),
            coordinator_store: Arc::new(NatsStore::new(
                coordinator_client,
                NatsStoreOptions::default(),
            )),
        })
    }
}

/// The history an edge keeps: its routes' rules made in `store` before it serves (a
/// route that promises history and cannot keep it does not start); none without rules.
async fn history_store(
    cfg: &Config,
    store: SharedHistory,
) -> anyhow::Result<Option<SharedHistory>> {
    let rules = cfg.edge.history_rules();
    if rules.is_empty() {
        return Ok(None);
    }
    store.ensure(&rules).await.with_context(|| {
        "cannot make the storage of edge.routes[].history (cluster mode needs JetStream: nats-server -js)"
    })?;
    Ok(Some(store))
}

/// The user the banner's URLs connect as.
const EXAMPLE_USER: &str = "alice";
/// The lifetime of the token the banner mints.
const EXAMPLE_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// How a client connects to one route, as the banner prints it.
#[derive(Debug)]
struct ClientHint {
    url: String,
    /// A request header the client must send (the token, when the route reads no query
    /// parameter).
    header: Option<String>,
    /// Said after the URL.
    note: String,
    /// The command whose output is `$TOKEN` in `url`.
    command: Option<String>,
}

/// The URL (under `base`, e.g. `ws://127.0.0.1:8080`) at which `route` admits
/// [`EXAMPLE_USER`]: its path with `{param}` segments filled in, and the user or a token.
fn client_hint(route: &RouteConfig, base: &str) -> ClientHint {
    let path = route.path.replace(['{', '}'], "");
    let mut hint = ClientHint {
        url: format!("{base}{path}"),
        header: None,
        note: String::new(),
        command: None,
    };
    let token = match crate::token::for_route(route, EXAMPLE_USER, EXAMPLE_TOKEN_TTL) {
        Ok(RouteToken::None) => {
            hint.url = format!("{}?{}={EXAMPLE_USER}", hint.url, route.user_query);
            return hint;
        }
        Ok(RouteToken::Minted(token)) => {
            let ttl = humantime_serde::re::humantime::format_duration(EXAMPLE_TOKEN_TTL);
            hint.note = format!("   (HS256 token for {EXAMPLE_USER}, minted now, valid {ttl})");
            token
        }
        Ok(RouteToken::Command(command)) => {
            hint.note = "   (TOKEN: see the next line)".to_owned();
            hint.command = Some(command);
            "$TOKEN".to_owned()
        }
        Err(error) => {
            hint.note = format!("   (no example token: {error})");
            return hint;
        }
    };
    let a = &route.auth;
    if let Some(query) = &a.query {
        hint.url = format!("{}?{query}={token}", hint.url);
    } else if a.header {
        hint.header = Some(format!("Authorization: Bearer {token}"));
        hint.note = format!(
            "   with header 'Authorization: Bearer {token}'{}",
            hint.note
        );
    } else if let Some(cookie) = &a.cookie {
        hint.header = Some(format!("Cookie: {cookie}={token}"));
        hint.note = format!("   with header 'Cookie: {cookie}={token}'{}", hint.note);
    }
    hint
}

/// Embedded mode: the edge's placement reports go straight into the directory.
async fn feed_directory(
    edge: Edge,
    coordinator: Coordinator,
    address: String,
    shutdown: CancellationToken,
) {
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => break,
            b = edge.next_report(&address) => b,
        };
        // The edge reports to this coordinator alone: its shares are of this one-member ring.
        let batch = if batch.full {
            ReportBatch {
                ring: coordinator.cluster().ring_members(),
                ..batch
            }
        } else {
            batch
        };
        coordinator.apply(batch).await;
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT; exits at once (130) on the second. The
/// handlers are installed before this returns, so no signal after it is missed.
pub fn spawn_signal_handler(token: CancellationToken) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        for round in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            if round == 0 {
                tracing::info!("shutdown requested; draining (signal again to exit now)");
                token.cancel();
            } else {
                std::process::exit(130);
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_hints_fill_the_path_and_carry_the_token_where_the_route_reads_it() {
        let mut route = RouteConfig {
            path: "/room/{id}".into(),
            anonymous: true,
            user_query: "name".into(),
            ..RouteConfig::default()
        };
        let hint = client_hint(&route, "ws://h:1");
        assert_eq!(hint.url, "ws://h:1/room/id?name=alice");
        assert!(hint.header.is_none() && hint.command.is_none());

        route.anonymous = false;
        route.auth.hs256_secret = Some("s3cret".into());
        route.auth.query = None;
        let hint = client_hint(&route, "ws://h:1");
        assert_eq!(hint.url, "ws://h:1/room/id");
        let header = hint.header.unwrap();
        assert!(header.starts_with("Authorization: Bearer ey"), "{header}");

        route.auth.hs256_secret = None;
        route.auth.rs256_public_key_file = Some("/k.pem".into());
        route.auth.query = Some("jwt".into());
        let hint = client_hint(&route, "ws://h:1");
        assert_eq!(hint.url, "ws://h:1/room/id?jwt=$TOKEN");
        assert!(
            hint.command
                .unwrap()
                .starts_with("switchboard token --alg RS256")
        );
    }
}
