//! The real `switchboard` binary (or another server a test runs, such as haproxy) as a child
//! process: started with a clean environment, found through the banner it prints, signalled
//! (also stopped and continued, as a stalled process), killed (and reaped) when its guard
//! drops; its output is kept and printed when a test fails.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio::time::timeout;

use super::poll::{STEP, bounded};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// Lines of each process's output printed when a test fails.
const TAIL: usize = 80;
/// Lines of each process's output kept.
const KEEP: usize = 2_000;

/// A `switchboard` command with none of the caller's `SWITCHBOARD_*` variables, so that a
/// developer's shell cannot change what the tests see.
pub fn switchboard() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("SWITCHBOARD_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// `switchboard <role> --config <config> --nats <nats_url> --node-id <id>` with every
/// listener of the role on a free loopback port; the caller adds the rest (seeds, env).
pub fn node_command(role: &str, config: &Path, nats_url: &str, id: &str) -> Command {
    let mut cmd = switchboard();
    cmd.arg(role)
        .arg("--config")
        .arg(config)
        .args(["--nats", nats_url])
        .args(["--node-id", id]);
    match role {
        "coordinator" => cmd.args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ]),
        _ => cmd.args(["--listen", "127.0.0.1:0"]),
    };
    cmd
}

/// The gRPC and HTTP addresses in a coordinator's banner line.
pub fn coordinator_banner(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    let grpc = after(line, "grpc")?.parse().ok()?;
    let http = after(line, "http")?.strip_prefix("http://")?.parse().ok()?;
    Some((grpc, http))
}

/// The WebSocket address in an edge's banner line, whose URL has `scheme` (`ws`, `wss`).
pub fn edge_banner(line: &str, scheme: &str) -> Option<SocketAddr> {
    after(line, "websocket")?
        .strip_prefix(scheme)?
        .strip_prefix("://")?
        .trim_end_matches('/')
        .parse()
        .ok()
}

/// The word after `key` in a banner line.
pub fn after<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let mut words = line.split_whitespace();
    words.find(|w| *w == key)?;
    words.next()
}

/// A running child process; SIGKILLed (also when paused) and reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Child,
    output: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Proc {
    /// Spawns `cmd` and waits for the stdout line for which `banner` returns `Some` (it sees
    /// every line until then, so it may gather a banner of several lines).
    pub async fn start<T>(
        name: &str,
        cmd: Command,
        mut banner: impl FnMut(&str) -> Option<T>,
    ) -> (Self, T) {
        let (proc, mut rx) = Self::launch(name, cmd);
        let found = timeout(STEP, async {
            while let Some(line) = rx.recv().await {
                if let Some(v) = banner(&line) {
                    return Some(v);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(v)) => (proc, v),
            // The process's output is printed as the guard drops.
            Ok(None) => panic!("{name} closed stdout without printing its banner"),
            Err(_) => panic!("{name} printed no banner within {STEP:?}"),
        }
    }

    /// Spawns `cmd` without waiting for anything (for a server that prints no banner: the
    /// caller waits for it to serve).
    pub fn spawn(name: &str, cmd: Command) -> Self {
        Self::launch(name, cmd).0
    }

    fn launch(name: &str, mut cmd: Command) -> (Self, mpsc::Receiver<String>) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn the switchboard binary");
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel(64);
        let stdout = child.stdout.take().unwrap().into_owned_fd().unwrap();
        let stderr = child.stderr.take().unwrap().into_owned_fd().unwrap();
        let readers = vec![
            collect(stdout, Arc::clone(&output), Some(tx)),
            collect(stderr, Arc::clone(&output), None),
        ];
        let proc = Self {
            name: name.to_owned(),
            child,
            output,
            readers,
        };
        (proc, rx)
    }

    /// SIGKILL, as in a crash; waits until the process is gone.
    pub async fn kill(&mut self) {
        bounded(&format!("SIGKILL of {}", self.name), self.child.kill())
            .await
            .unwrap_or_else(|e| panic!("kill {}: {e}", self.name));
    }

    /// Sends SIGTERM, as an orchestrator stopping the process does.
    pub async fn terminate(&self) {
        self.signal("TERM").await;
    }

    /// Sends SIGSTOP: the process stalls with its sockets open, as in a long pause.
    pub async fn pause(&self) {
        self.signal("STOP").await;
    }

    /// Sends SIGCONT to a paused process.
    pub async fn resume(&self) {
        self.signal("CONT").await;
    }

    /// Sends SIGHUP, which makes the process reload its certificates.
    pub async fn hangup(&self) {
        self.signal("HUP").await;
    }

    /// Sends `SIG<name>` through the shell's own `kill` (no procps, no signal crate needed).
    async fn signal(&self, name: &str) {
        let mut kill = Command::new("sh");
        kill.args(["-c", &format!("kill -{name} {}", self.pid())])
            .kill_on_drop(true);
        let status = bounded(&format!("kill -{name} {}", self.name), kill.status())
            .await
            .expect("run kill(1)");
        assert!(
            status.success(),
            "kill -{name} {} failed: {status}",
            self.name
        );
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait(&mut self) -> ExitStatus {
        match timeout(STEP, self.child.wait()).await {
            Ok(status) => status.unwrap_or_else(|e| panic!("wait for {}: {e}", self.name)),
            Err(_) => panic!("{} did not exit within {STEP:?}", self.name),
        }
    }

    /// Everything the process printed so far (stdout and stderr; the last 2000 lines).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    /// The process id, e.g. to send it a signal.
    pub fn pid(&self) -> u32 {
        self.child
            .id()
            .expect("the process has not been waited for")
    }

    pub fn tail(&self) -> String {
        let out = self.output.lock().unwrap_or_else(|e| e.into_inner());
        let from = out.len().saturating_sub(TAIL);
        out[from..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let mut reaped = !matches!(self.child.try_wait(), Ok(None));
        if !reaped {
            let _ = self.child.start_kill();
            // Bounded reap, so that no process outlives a failing test as a zombie.
            for _ in 0..500 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    reaped = true;
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        if std::thread::panicking() {
            if reaped {
                // The pipes are at their end: let the readers catch up before printing.
                for r in self.readers.drain(..) {
                    let _ = r.join();
                }
            }
            eprintln!(
                "---- {} output (last {TAIL} lines) ----\n{}",
                self.name,
                self.tail()
            );
        }
    }
}

/// Copies the lines of a child's pipe into `into` (and `tx`, while it has room), on a thread
/// of its own so that the output is there even when the test panics.
fn collect(
    fd: std::os::fd::OwnedFd,
    into: Arc<Mutex<Vec<String>>>,
    tx: Option<mpsc::Sender<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(std::fs::File::from(fd)).lines() {
            let Ok(line) = line else { break };
            if let Some(tx) = &tx {
                let _ = tx.try_send(line.clone());
            }
            let mut out = into.lock().unwrap_or_else(|e| e.into_inner());
            if out.len() == KEEP {
                out.remove(0);
            }
            out.push(line);
        }
    })
}
