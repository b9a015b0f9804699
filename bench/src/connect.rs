//! `connect`: handshakes per second on a JWT route: connect, upgrade with an HS256 token
//! (`?token=`), send `init`, wait for `session`, drop the connection.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::{Common, emit};
use crate::fanout::latency;
use crate::procstat::{Watch, round1};
use crate::recv::new_histogram;
use crate::ws::{self, WsUrl};

/// Time allowed for one connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    pub(crate) common: Common,
    /// The JWT route, e.g. ws://127.0.0.1:8080/jwt.
    #[arg(long)]
    pub(crate) url: String,
    /// The route's HS256 secret.
    #[arg(long)]
    pub(crate) secret: String,
    /// Connections at most (the run also ends after --duration seconds).
    #[arg(long, default_value_t = 50_000)]
    pub(crate) count: u64,
    /// Connections in progress at once.
    #[arg(long, default_value_t = 64)]
    pub(crate) concurrency: usize,
    /// Distinct tokens (users), used in turn.
    #[arg(long, default_value_t = 1000)]
    pub(crate) tokens: usize,
}

pub(crate) async fn run(a: Args) -> anyhow::Result<()> {
    let c = &a.common;
    let url = WsUrl::parse(&a.url)?;
    let tokens = Rc::new(mint(&a.secret, a.tokens.max(1))?);
    let next = Rc::new(Cell::new(0u64));
    let hist = Rc::new(RefCell::new(new_histogram()));
    let errors = Rc::new(RefCell::new((0u64, None::<String>)));
    let watch = Watch::start(&c.server_pid);
    let t0 = tokio::time::Instant::now();
    let deadline = t0 + Duration::from_secs_f64(c.duration);
    let mut workers = Vec::new();
    for _ in 0..a.concurrency {
        let (url, tokens, next) = (url.clone(), Rc::clone(&tokens), Rc::clone(&next));
        let (hist, errors, count) = (Rc::clone(&hist), Rc::clone(&errors), a.count);
        workers.push(tokio::task::spawn_local(async move {
            loop {
                let i = next.get();
                if i >= count || tokio::time::Instant::now() >= deadline {
                    break;
                }
                next.set(i + 1);
                let token = &tokens[(i % tokens.len() as u64) as usize];
                let started = tokio::time::Instant::now();
                match one(&url.with_param("token", token)).await {
                    Ok(()) => {
                        let us = started.elapsed().as_micros() as u64;
                        hist.borrow_mut().saturating_record(us);
                    }
                    Err(e) => {
                        let mut errs = errors.borrow_mut();
                        errs.0 += 1;
                        errs.1.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await?;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let usage = watch.finish();
    let h = hist.borrow();
    let errs = errors.borrow();
    emit(&json!({
        "scenario": "connect",
        "tag": c.tag,
        "target": c.target(),
        "concurrency": a.concurrency,
        "handshakes": h.len(),
        "handshakes_per_s": (h.len() as f64 / elapsed).round(),
        "errors": errs.0,
        "first_error": errs.1,
        "elapsed_s": round1(elapsed),
        "latency_ms": latency(&h),
        "usage": usage,
    }));
    Ok(())
}

/// One connection up to its `session` frame.
async fn one(url: &WsUrl) -> anyhow::Result<()> {
    let mut up = ws::connect(url, CONNECT_TIMEOUT).await?;
    up.stream
        .write_all(&ws::text("{\"type\":\"init\"}"))
        .await?;
    ws::read_until(&mut up.stream, up.rest, CONNECT_TIMEOUT, |p| {
        memchr::memmem::find(p, b"\"session\"").is_some()
    })
    .await?;
    Ok(())
}

/// HS256 tokens for users `c0`, `c1`, … valid for an hour.
fn mint(secret: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let key = EncodingKey::from_secret(secret.as_bytes());
    (0..n)
        .map(|i| {
            let claims = json!({"sub": format!("c{i}"), "iat": now, "exp": now + 3600});
            Ok(jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &key,
            )?)
        })
        .collect()
}
