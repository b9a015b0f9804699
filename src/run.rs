//! Wiring a mode together: build the bus, the edge and the coordinator from the config, bind,
//! serve, and drain on the first signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bus::{LocalBus, SharedBus};
use coordinator::Coordinator;
use edge::Edge;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Resolved};

/// Queue length of each in-process bus subscription.
const LOCAL_BUS_QUEUE: usize = 65_536;

/// The embedded mode: one edge and one coordinator over the in-process bus, bound and ready
/// to serve.
#[derive(Debug)]
pub struct DevNode {
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    edge: Edge,
    coordinator: Coordinator,
    bus: SharedBus,
    ws: TcpListener,
    grpc: TcpListener,
    cfg: Config,
}

impl DevNode {
    pub async fn bind(resolved: Resolved) -> anyhow::Result<Self> {
        let cfg = resolved.config;
        let node_id = cfg
            .node_id
            .clone()
            .unwrap_or_else(|| format!("dev-{}", ulid::Ulid::new()));
        let bus: SharedBus = Arc::new(LocalBus::new(LOCAL_BUS_QUEUE));
        let edge = Edge::new(
            node_id,
            cfg.edge.clone(),
            &resolved.rs256_pems,
            Arc::clone(&bus),
        )?;
        let coordinator = Coordinator::new(Arc::clone(&bus), cfg.coordinator.request_timeout);
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
        Ok(Self {
            ws_addr,
            grpc_addr,
            edge,
            coordinator,
            bus,
            ws,
            grpc,
            cfg,
        })
    }

    /// The in-process bus, for backends living in the same process (and tests playing one).
    pub fn bus(&self) -> SharedBus {
        Arc::clone(&self.bus)
    }

    /// What a person starting `switchboard dev` needs to know.
    pub fn banner(&self) -> String {
        let (ws, grpc) = (self.ws_addr, self.grpc_addr);
        let route = self
            .cfg
            .edge
            .routes
            .first()
            .map_or("/connect", |r| r.path.as_str());
        format!(
            "switchboard dev: one process, in-process bus (embedded mode)\n\
             \x20 websocket  ws://{ws}{route}?user=alice\n\
             \x20 grpc       {grpc}   (grpcurl -plaintext {grpc} list)\n\
             \x20 health     http://{ws}/readyz   metrics: http://{ws}/metrics\n\
             \x20 try        websocat 'ws://{ws}{route}?user=alice'  then send {{\"type\":\"subscribe\",\"topic\":\"chat/+\"}}\n"
        )
    }

    /// Serves until `shutdown` is cancelled, then drains and returns.
    pub async fn serve(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        for r in self.cfg.edge.routes.iter().filter(|r| r.anonymous) {
            tracing::warn!(route = %r.path, "anonymous route: anyone can connect as any user; not for production");
        }
        tracing::info!(websocket = %self.ws_addr, grpc = %self.grpc_addr, node = self.edge.node_id(), "serving");
        let address = self.ws_addr.to_string();
        let stop_feed = CancellationToken::new();
        let reports = tokio::spawn(feed_directory(
            self.edge.clone(),
            self.coordinator.clone(),
            address,
            stop_feed.clone(),
        ));
        let grpc_stop = CancellationToken::new();
        let grpc_task = tokio::spawn(coordinator::grpc::serve(
            self.grpc,
            self.coordinator,
            grpc_stop.clone(),
        ));
        self.edge.serve(self.ws, shutdown).await?;
        grpc_stop.cancel();
        stop_feed.cancel();
        grpc_task.await?.context("grpc server failed")?;
        let _ = reports.await;
        Ok(())
    }
}

/// Embedded mode: the edge's placement reports go straight into the directory.
async fn feed_directory(
    edge: Edge,
    coordinator: Coordinator,
    address: String,
    shutdown: CancellationToken,
) {
    let started = tokio::time::Instant::now();
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => break,
            b = edge.next_report(&address) => b,
        };
        let now: Duration = started.elapsed();
        coordinator.directory().apply(batch, now);
    }
}

/// Cancels `token` on the first SIGTERM or SIGINT; exits at once (130) on the second.
pub fn spawn_signal_handler(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(error) => {
                    tracing::error!(%error, "cannot install the SIGTERM handler");
                    return;
                }
            };
        for round in 0..2 {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            if round == 0 {
                tracing::info!("shutdown requested; draining (signal again to exit now)");
                token.cancel();
            } else {
                std::process::exit(130);
            }
        }
    });
}
