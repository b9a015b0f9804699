//! A real `nats-server` for tests (feature `testkit`).
//!
//! [`TestNats::start`] runs the `nats-server` binary found through `NATS_SERVER_BIN` or
//! `PATH` on `127.0.0.1` with ports chosen by the server (`-p -1`, `-m -1`) and JetStream on
//! a fresh temporary store directory, and waits for its "Listening for client connections"
//! log line. The process is killed when the [`TestNats`] is dropped, and the store removed.
//!
//! [`TestNats::start_with_config`] adds a config file of the test's (users, permissions,
//! TLS); the flags above still win over it.
//!
//! A missing binary fails the test with instructions; it never skips.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStderr, Command};

/// How long the server may take to log that it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// Log lines kept for failure messages.
const LOG_LINES: usize = 200;

const CLIENT_LINE: &str = "Listening for client connections on ";
const MONITOR_LINE: &str = "Starting http monitor on ";

/// A running `nats-server` (JetStream enabled) on loopback.
#[derive(Debug)]
pub struct TestNats {
    bin: PathBuf,
    store: PathBuf,
    config: Option<PathBuf>,
    port: u16,
    monitor_port: u16,
    child: Option<Child>,
    log: Arc<Mutex<VecDeque<String>>>,
}

impl TestNats {
    /// Starts a server on free ports. Panics if the binary is missing or does not come up.
    pub async fn start() -> Self {
        Self::launch(None).await
    }

    /// Starts a server that also reads `config` (`-c`), e.g. users with permissions and TLS.
    /// Files it includes are found relative to it.
    pub async fn start_with_config(config: &Path) -> Self {
        Self::launch(Some(config.to_owned())).await
    }

    async fn launch(config: Option<PathBuf>) -> Self {
        let bin = find_binary();
        let store = unique_store_dir();
        let mut nats = Self {
            bin,
            store,
            config,
            port: 0,
            monitor_port: 0,
            child: None,
            log: Arc::new(Mutex::new(VecDeque::with_capacity(LOG_LINES))),
        };
        nats.spawn(None).await;
        nats
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` of the monitoring endpoint (`/varz`, `/connz`, ...).
    pub fn monitor_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.monitor_port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across [`restart`](Self::restart)).
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// Whether the server process is running (not [`kill`](Self::kill)ed).
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// The last lines the server logged, for failure messages.
    pub fn recent_log(&self) -> String {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Kills the server (SIGKILL, as in a crash) and waits for the process to exit.
    /// Clients see the connection drop and start reconnecting.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().await.expect("kill nats-server");
        }
    }

    /// Stalls the server (SIGSTOP) with its sockets open: clients still count themselves
    /// connected and every round trip waits, as in a long pause of the process. Returns
    /// once every thread of the server is stopped (the signal is delivered asynchronously).
    pub async fn pause(&self) {
        self.signal("STOP").await;
        let tasks = PathBuf::from(format!("/proc/{}/task", self.pid()));
        let all_stopped = || {
            std::fs::read_dir(&tasks).ok().is_some_and(|dir| {
                dir.flatten().all(|task| {
                    let stat =
                        std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
                    // `pid (comm) S …`: the state follows the command's closing parenthesis.
                    let state = stat
                        .rsplit_once(") ")
                        .and_then(|(_, rest)| rest.chars().next());
                    matches!(state, Some('T' | 't'))
                })
            })
        };
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        while !all_stopped() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "nats-server did not stop on SIGSTOP"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Lets a [`pause`](Self::pause)d server run again (SIGCONT).
    pub async fn resume(&self) {
        self.signal("CONT").await;
    }

    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .and_then(Child::id)
            .expect("nats-server is running")
    }

    /// Sends `SIG<name>` through the shell's own `kill` (no procps needed).
    async fn signal(&self, name: &str) {
        let pid = self.pid();
        let status = Command::new("sh")
            .args(["-c", &format!("kill -{name} {pid}")])
            .status()
            .await
            .expect("run kill(1)");
        assert!(status.success(), "kill -{name} nats-server: {status}");
    }

    /// Kills the server if it runs, then starts it again on the same client and monitoring
    /// ports and the same JetStream store, so that clients reconnect to it.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.spawn(Some((self.port, self.monitor_port))).await;
    }

    async fn spawn(&mut self, ports: Option<(u16, u16)>) {
        let (port, monitor) = match ports {
            Some((p, m)) => (p.to_string(), m.to_string()),
            None => ("-1".to_owned(), "-1".to_owned()),
        };
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let mut child = command
            .args(["-a", "127.0.0.1", "-p", &port, "-m", &monitor, "-js", "-sd"])
            .arg(&self.store)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let ready = tokio::time::timeout(READY_TIMEOUT, self.read_ports(stderr)).await;
        match ready {
            Ok(Some((port, monitor_port))) => {
                self.port = port;
                self.monitor_port = monitor_port;
                self.child = Some(child);
            }
            Ok(None) => panic!(
                "nats-server exited before listening (status {:?}); log:\n{}",
                child.wait().await.ok(),
                self.recent_log()
            ),
            Err(_) => panic!(
                "nats-server did not listen within {READY_TIMEOUT:?}; log:\n{}",
                self.recent_log()
            ),
        }
    }

    /// Reads the log until the client port is known, then keeps draining it in the
    /// background (a full pipe would stall the server). `None` if the log ends first.
    async fn read_ports(&self, stderr: ChildStderr) -> Option<(u16, u16)> {
        let mut lines = BufReader::new(stderr).lines();
        let mut monitor_port = None;
        let client_port = loop {
            let line = lines.next_line().await.ok()??;
            if let Some(port) = port_after(&line, MONITOR_LINE) {
                monitor_port = Some(port);
            }
            let port = port_after(&line, CLIENT_LINE);
            remember(&self.log, line);
            if let Some(port) = port {
                break port;
            }
        };
        let log = Arc::clone(&self.log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                remember(&log, line);
            }
        });
        // The monitor starts before the client listener; no line means it is disabled.
        Some((client_port, monitor_port.unwrap_or(0)))
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.store);
    }
}

/// The port at the end of `... <marker>127.0.0.1:PORT`.
fn port_after(line: &str, marker: &str) -> Option<u16> {
    let (_, addr) = line.split_once(marker)?;
    let (_, port) = addr.trim().rsplit_once(':')?;
    port.parse().ok()
}

fn remember(log: &Mutex<VecDeque<String>>, line: String) {
    let mut log = log.lock().unwrap_or_else(PoisonError::into_inner);
    if log.len() == LOG_LINES {
        log.pop_front();
    }
    log.push_back(line);
}

/// `NATS_SERVER_BIN`, else `nats-server` on `PATH`; panics with instructions otherwise.
fn find_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        assert!(
            bin.is_file(),
            "NATS_SERVER_BIN={} is not a file; unset it or point it at a nats-server binary",
            bin.display()
        );
        return bin;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
        .expect(
            "nats-server not found on PATH (or NATS_SERVER_BIN): run `scripts/test`, which \
         installs it, or install nats-server yourself",
        )
}

fn unique_store_dir() -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    std::env::temp_dir().join(format!(
        "switchboard-nats-{}-{}-{nanos}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_log_formats() {
        let v215 = "[5096] 2026/11/22 03:11:24.848718 [INF] Listening for client connections on 127.0.0.1:41597";
        let v29 = "[5442] 2026/11/22 03:11:30.721693 [INF] Listening for client connections on 127.0.0.1:34083";
        let mon =
            "[5096] 2026/11/22 03:11:24.846911 [INF] Starting http monitor on 127.0.0.1:37177";
        assert_eq!(port_after(v215, CLIENT_LINE), Some(41597));
        assert_eq!(port_after(v29, CLIENT_LINE), Some(34083));
        assert_eq!(port_after(mon, MONITOR_LINE), Some(37177));
        assert_eq!(port_after(mon, CLIENT_LINE), None);
    }
}
