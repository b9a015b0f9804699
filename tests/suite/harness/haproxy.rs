//! haproxy in front of a cluster's edges, on the very config `deploy/local/cluster.sh`
//! writes (its health checks, retries and redispatch, its log format), with the ports of the
//! test: the listener on a free loopback port, the edges as servers, and a stats page on
//! another free port so that a test can see what haproxy thinks of each edge.
//!
//! `haproxy` must be installed (`scripts/test` installs the Debian package); without it the
//! tests fail, they never skip.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::process::Command;

use super::http::http_get;
use super::poll::{STEP, poll_for};
use super::process::Proc;

pub const MISSING_HAPROXY: &str = "haproxy is not on PATH nor in /usr/sbin: run `scripts/test`, \
     which installs it (Debian package `haproxy`); this test does not skip without it";

/// The script whose haproxy config the tests run.
const CLUSTER_SH: &str = "deploy/local/cluster.sh";

/// One server line of haproxy's stats: what it thinks of one edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerStat {
    /// `edge-1`, `edge-2`, … in the order of the servers given to [`Haproxy::start`].
    pub name: String,
    /// `UP`, `DOWN`, `UP 1/2`, `DOWN 1/2`, `no check`, …
    pub status: String,
    /// Connections retried on this server (`wretr`).
    pub retries: u64,
    /// Connections redispatched away from this server (`wredis`).
    pub redispatches: u64,
}

/// A running haproxy; killed when dropped.
#[derive(Debug)]
pub struct Haproxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    stats: SocketAddr,
    pub proc: Proc,
}

/// The haproxy binary: on `PATH`, else in `/usr/sbin` or `/sbin` (Debian puts it there, and
/// not every user has them on `PATH`); fails the test with instructions otherwise.
pub fn haproxy_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{MISSING_HAPROXY}"))
}

/// The haproxy config of `deploy/local/cluster.sh` (the text its `write_haproxy_config`
/// writes before the server lines), with `$LB_PORT` still in it.
pub fn deploy_local_haproxy_config() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(CLUSTER_SH);
    let script =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let (_, function) = script
        .split_once("write_haproxy_config() {")
        .unwrap_or_else(|| panic!("{CLUSTER_SH} has no write_haproxy_config function"));
    let (_, heredoc) = function
        .split_once("cat <<EOF\n")
        .unwrap_or_else(|| panic!("write_haproxy_config in {CLUSTER_SH} has no `cat <<EOF`"));
    let (config, _) = heredoc
        .split_once("\nEOF\n")
        .unwrap_or_else(|| panic!("the haproxy heredoc in {CLUSTER_SH} does not end"));
    format!("{config}\n")
}

/// A free loopback port: bound by the kernel (port 0), then released for a server that
/// cannot bind port 0 and tell which port it got.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("a bound address").port()
}

impl Haproxy {
    /// Starts haproxy in `dir` on `deploy/local`'s config in front of `edges` (servers
    /// `edge-1`, `edge-2`, …) and waits until it serves and checks every edge UP.
    pub async fn start(dir: &Path, edges: &[SocketAddr]) -> Self {
        let bin = haproxy_bin();
        let (port, stats_port) = (free_port(), free_port());
        let mut text = deploy_local_haproxy_config().replace("$LB_PORT", &port.to_string());
        assert!(
            !text.contains('$'),
            "the haproxy config of {CLUSTER_SH} has a variable the tests do not fill in:\n{text}"
        );
        for (i, edge) in edges.iter().enumerate() {
            text.push_str(&format!("    server edge-{} {edge}\n", i + 1));
        }
        text.push_str(&format!(
            "\n# Added by the tests: what haproxy thinks of each edge.\nfrontend stats\n    \
             bind 127.0.0.1:{stats_port}\n    stats enable\n    stats uri /stats\n"
        ));
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, &text).unwrap();

        let check = Command::new(&bin)
            .args(["-c", "-q", "-f"])
            .arg(&config)
            .kill_on_drop(true)
            .output();
        let check = tokio::time::timeout(STEP, check)
            .await
            .expect("haproxy -c finished")
            .unwrap_or_else(|e| panic!("cannot run {}: {e}; {MISSING_HAPROXY}", bin.display()));
        assert!(
            check.status.success(),
            "haproxy -c refuses the config derived from {CLUSTER_SH}: {}\n{text}",
            String::from_utf8_lossy(&check.stderr)
        );

        let mut cmd = Command::new(&bin);
        cmd.arg("-db").arg("-f").arg(&config);
        let proxy = Self {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            stats: SocketAddr::from(([127, 0, 0, 1], stats_port)),
            proc: Proc::spawn("haproxy", cmd),
        };
        let mut last = Vec::new();
        let up = poll_for(STEP, async || {
            last = proxy.try_servers().await.ok()?;
            (last.len() == edges.len() && last.iter().all(|s| s.status == "UP")).then_some(())
        })
        .await;
        assert!(
            up.is_some(),
            "haproxy did not serve with every edge UP within {STEP:?}; last stats: {last:?}"
        );
        proxy
    }

    /// What haproxy thinks of each edge now; fails the test when the stats page does not
    /// answer.
    pub async fn servers(&self) -> Vec<ServerStat> {
        self.try_servers()
            .await
            .unwrap_or_else(|e| panic!("haproxy stats: {e}"))
    }

    async fn try_servers(&self) -> Result<Vec<ServerStat>, String> {
        let (status, csv) = http_get(self.stats, "/stats;csv").await?;
        if status != 200 {
            return Err(format!("GET /stats;csv answered {status}: {csv}"));
        }
        Ok(parse_stats(&dechunk(&csv)))
    }

    /// Everything haproxy logged (one line per finished connection).
    pub fn log(&self) -> String {
        self.proc.output()
    }
}

/// A body sent with `transfer-encoding: chunked` (haproxy's stats page is), decoded; any
/// other body as it is.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    out
}

/// The server rows of haproxy's CSV stats (`# pxname,svname,…` header).
fn parse_stats(csv: &str) -> Vec<ServerStat> {
    let mut lines = csv.lines();
    let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st), Some(retr), Some(redis)) = (
        col("pxname"),
        col("svname"),
        col("status"),
        col("wretr"),
        col("wredis"),
    ) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > px.max(sv).max(st) && f[px] == "edges")
        .filter(|f| f[sv] != "BACKEND" && f[sv] != "FRONTEND")
        .map(|f| ServerStat {
            name: f[sv].to_owned(),
            status: f[st].to_owned(),
            retries: f.get(retr).and_then(|v| v.parse().ok()).unwrap_or(0),
            redispatches: f.get(redis).and_then(|v| v.parse().ok()).unwrap_or(0),
        })
        .collect()
}
