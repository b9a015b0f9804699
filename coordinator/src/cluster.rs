//! This coordinator's view of the others: membership learned from announcements on the bus,
//! the ring built from it, and a lazily connected gRPC channel per peer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bus::tls::Dialer;
use bus::{Outgoing, SharedBus};
use futures::StreamExt;
use membership::{Membership, Ring};
use prost::Message as _;
use proto::subject;
use proto::v1::CoordinatorAnnounce;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How long a forwarded call may take to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Membership, ring and peer channels.
#[derive(Debug)]
pub struct Cluster {
    self_id: String,
    self_address: String,
    view: RwLock<View>,
    channels: Mutex<HashMap<String, (String, Channel)>>,
    /// How peers are dialed (TLS with `cluster.tls`).
    dialer: RwLock<Dialer>,
}

#[derive(Debug)]
struct View {
    membership: Membership,
    ring: Ring,
}

/// Where a key's owner is.
#[derive(Debug, Clone)]
pub enum Owner {
    Me,
    Peer(String, Channel),
}

impl Cluster {
    /// A cluster of one (this coordinator) until others announce themselves.
    pub fn new(self_id: String, self_address: String, member_timeout: Duration) -> Self {
        let mut membership = Membership::new(member_timeout);
        membership.observe(&self_id, &self_address, false, Duration::ZERO);
        let ring = membership.ring();
        Self {
            self_id,
            self_address,
            view: RwLock::new(View { membership, ring }),
            channels: Mutex::new(HashMap::new()),
            dialer: RwLock::default(),
        }
    }

    /// Peers are dialed with `dialer` from now on.
    pub fn set_dialer(&self, dialer: Dialer) {
        *self.dialer.write().expect("dialer poisoned") = dialer;
        self.channels.lock().expect("channels poisoned").clear();
    }

    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    pub fn ring(&self) -> Ring {
        self.view
            .read()
            .expect("cluster view poisoned")
            .ring
            .clone()
    }

    /// The ring's members, sorted.
    pub fn ring_members(&self) -> Vec<String> {
        let view = self.view.read().expect("cluster view poisoned");
        view.ring.members().to_vec()
    }

    /// The owner of `namespace/user`.
    pub fn owner(&self, namespace: &str, user: &str) -> Owner {
        let owner: Option<String> = self.ring().owner(namespace, user).map(str::to_owned);
        match owner {
            Some(id) if id != self.self_id => match self.channel(&id) {
                Some(ch) => Owner::Peer(id, ch),
                None => Owner::Me,
            },
            _ => Owner::Me,
        }
    }

    /// Whether this coordinator owns an arbitrary key (e.g. `node/<id>` for node events).
    pub fn owns(&self, key: &str) -> bool {
        self.ring().owner_of(key).is_none_or(|o| o == self.self_id)
    }

    /// Every member with its address.
    pub fn members(&self) -> Vec<(String, String)> {
        let view = self.view.read().expect("cluster view poisoned");
        view.membership
            .members()
            .map(|m| (m.node_id.clone(), m.address.clone()))
            .collect()
    }

    /// Every other member with its channel.
    pub fn peers(&self) -> Vec<(String, Channel)> {
        let ids: Vec<String> = self
            .ring()
            .members()
            .iter()
            .filter(|m| **m != self.self_id)
            .cloned()
            .collect();

        ids.into_iter()
            .filter_map(|id| self.channel(&id).map(|ch| (id, ch)))
            .collect()
    }

    /// Records an announcement; true when the ring changed.
    pub fn observe(&self, a: &CoordinatorAnnounce, now: Duration) -> bool {
        let mut view = self.view.write().expect("cluster view poisoned");
        let changed = view
            .membership
            .observe(&a.node_id, &a.grpc_address, a.leaving, now);
        if changed {
            view.ring = view.membership.ring();
        }
        changed
    }

    /// Counts every member as just heard from (after this process's own bus outage).
    pub fn touch_all(&self, now: Duration) {
        self.view
            .write()
            .expect("cluster view poisoned")
            .membership
            .touch_all(now);
    }

    /// Drops silent members (never this one); true when the ring changed.
    pub fn expire(&self, now: Duration) -> bool {
        let mut view = self.view.write().expect("cluster view poisoned");
        view.membership
            .observe(&self.self_id, &self.self_address, false, now);
        let changed = view.membership.expire(now);
        if changed {
            view.ring = view.membership.ring();
        }
        changed
    }

    /// A peer could not be reached: take it out of the ring until it announces again.
    pub fn peer_failed(&self, node_id: &str) {
        if node_id == self.self_id {
            return;
        }
        let mut view = self.view.write().expect("cluster view poisoned");
        if view.membership.remove(node_id) {
            view.ring = view.membership.ring();
            tracing::warn!(
                node = node_id,
                "coordinator unreachable; removed from the ring"
            );
        }
    }

    fn channel(&self, node_id: &str) -> Option<Channel> {
        let address = {
            let view = self.view.read().expect("cluster view poisoned");
            view.membership.get(node_id)?.address.clone()
        };
        let mut channels = self.channels.lock().expect("channels poisoned");
        if let Some((a, ch)) = channels.get(node_id)
            && *a == address
        {
            return Some(ch.clone());
        }
        let dialer = self.dialer.read().expect("dialer poisoned").clone();
        let endpoint = dialer
            .endpoint(&address)
            .ok()?
            .connect_timeout(CONNECT_TIMEOUT);
        let ch = dialer.connect_lazy(&endpoint);
        channels.insert(node_id.to_owned(), (address, ch.clone()));
        Some(ch)
    }

    fn announcement(&self, leaving: bool) -> Vec<u8> {
        CoordinatorAnnounce {
            node_id: self.self_id.clone(),
            grpc_address: self.self_address.clone(),
            leaving,
        }
        .encode_to_vec()
    }
}

/// Announces this coordinator every `interval` (and at once when a process says hello),
/// listens to the others, expires silent ones; announces leaving on shutdown. Membership
/// times are durations since `epoch`, the start of the coordinator's clock. Takes only what it
/// uses, so that this module needs nothing of `messaging` (which needs it).
pub async fn run_membership(
    cluster: Arc<Cluster>,
    bus: SharedBus,
    epoch: tokio::time::Instant,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let now = || epoch.elapsed();
    let subs = match (
        bus.subscribe(subject::ANNOUNCE.into(), None).await,
        bus.subscribe(subject::HELLO.into(), None).await,
    ) {
        (Ok(a), Ok(h)) => (a, h),
        (Err(error), _) | (_, Err(error)) => {
            tracing::error!(%error, "cannot subscribe to coordinator announcements");
            return;
        }
    };
    let (mut announces, mut hellos) = subs;
    let announce = |leaving: bool| {
        let bus = bus.clone();
        let body = cluster.announcement(leaving);
        async move {
            if let Err(error) = bus.publish(Outgoing::new(subject::ANNOUNCE, body)).await {
                tracing::debug!(%error, "announcement not published");
            }
        }
    };
    announce(false).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bus_was_down = false;
    let mut last_tick = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = tick.tick() => {
                // A tick far later than due means this process was stopped: the others'
                // announcements are still queued, their silence was this side's. (Measured
                // before announcing: a slow publish is not a stall.)
                let stalled = last_tick.elapsed() > interval * 2;
                last_tick = tokio::time::Instant::now();
                announce(false).await;
                // Silence heard through a broken bus says nothing about the others.
                if !bus.is_connected() {
                    bus_was_down = true;
                    continue;
                }
                if std::mem::take(&mut bus_was_down) || stalled {
                    cluster.touch_all(now());
                    continue;
                }
                if cluster.expire(now()) {
                    tracing::info!(ring = ?cluster.ring().members(), "coordinator left the ring");
                }
            }
            Some(_) = hellos.next() => announce(false).await,
            Some(m) = announces.next() => {
                let Ok(a) = CoordinatorAnnounce::decode(m.payload.as_ref()) else { continue };
                if a.node_id != cluster.self_id() && cluster.observe(&a, now()) {
                    tracing::info!(ring = ?cluster.ring().members(), "ring changed");
                }
            }
        }
    }
    announce(true).await;
    let _ = bus.flush().await;
}
