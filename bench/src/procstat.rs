//! CPU time and resident memory of the server processes (and of the bench itself), from
//! `/proc/<pid>/stat` (utime + stime) and `/proc/<pid>/status` (VmRSS).

use serde_json::{Value, json};
use tokio::time::Instant;

/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const TICKS_PER_SECOND: f64 = 100.0;

/// CPU ticks and RSS of one process at one instant.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sample {
    pub(crate) ticks: u64,
    pub(crate) rss_kib: u64,
}

/// Reads one process; `None` when it is gone.
pub(crate) fn sample(pid: &str) -> Option<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may hold spaces: state is field 3, utime 14.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Sample {
        ticks: utime + stime,
        rss_kib: rss_kib(pid)?,
    })
}

/// `VmRSS` in KiB.
pub(crate) fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The processes watched during one measurement: the servers, and the bench itself.
#[derive(Debug, Clone)]
pub(crate) struct Watch {
    pids: Vec<String>,
    at: Instant,
    servers: Vec<Option<Sample>>,
    bench: Option<Sample>,
}

impl Watch {
    pub(crate) fn start(pids: &[String]) -> Self {
        Self {
            pids: pids.to_vec(),
            at: Instant::now(),
            servers: pids.iter().map(|p| sample(p)).collect(),
            bench: sample("self"),
        }
    }

    /// CPU used since [`Watch::start`] (% of one core) and RSS now, per server process and
    /// in total, plus the bench's own CPU.
    pub(crate) fn finish(&self) -> Value {
        let secs = self.at.elapsed().as_secs_f64().max(1e-3);
        let pct = |a: Option<Sample>, b: Option<Sample>| -> Option<f64> {
            let (a, b) = (a?, b?);
            Some(round1(
                (b.ticks.saturating_sub(a.ticks)) as f64 / TICKS_PER_SECOND / secs * 100.0,
            ))
        };
        let mut per = Vec::new();
        let (mut cpu, mut rss) = (0.0, 0);
        for (pid, before) in self.pids.iter().zip(&self.servers) {
            let now = sample(pid);
            let c = pct(*before, now);
            cpu += c.unwrap_or(0.0);
            rss += now.map_or(0, |s| s.rss_kib);
            per.push(json!({"pid": pid, "cpu_pct": c, "rss_kib": now.map(|s| s.rss_kib)}));
        }
        json!({
            "server_cpu_pct": round1(cpu),
            "server_rss_kib": rss,
            "servers": per,
            "bench_cpu_pct": pct(self.bench, sample("self")),
        })
    }
}

/// Waits (at most `max`) until the servers are idle: under 10% of a core over 200 ms, e.g.
/// after a step that left a backlog. Returns whether they were.
pub(crate) async fn settle(pids: &[String], max: std::time::Duration) -> bool {
    let period = std::time::Duration::from_millis(200);
    let deadline = Instant::now() + max;
    let ticks = || -> u64 { pids.iter().filter_map(|p| sample(p)).map(|s| s.ticks).sum() };
    loop {
        let before = ticks();
        tokio::time::sleep(period).await;
        if ticks().saturating_sub(before) <= 2 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
    }
}

pub(crate) fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let s = sample("self").unwrap();
        assert!(s.rss_kib > 0);
        let w = Watch::start(&["self".to_owned()]);
        let v = w.finish();
        assert!(v["server_rss_kib"].as_u64().unwrap() > 0);
    }
}
