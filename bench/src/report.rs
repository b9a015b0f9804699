//! `report`: the JSON lines of a run → the Markdown tables of the README's Performance
//! section: the bar, Switchboard over its peers, and every measurement.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use serde_json::Value;

const SB: &str = "switchboard";
const NATS: &str = "nats-server";
const NODE: &str = "node-ws";
/// Bench CPU (% of its core) from which a step's figures are bounded by the load generator.
const BENCH_SATURATED: f64 = 90.0;

/// A count printed without decimals.
fn int(v: &Value) -> String {
    v.as_f64().map_or_else(|| "–".into(), |x| format!("{x:.0}"))
}

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The JSON lines file `scripts/bench` wrote.
    pub(crate) results: PathBuf,
}

pub(crate) fn run(a: &Args) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.results)
        .with_context(|| format!("cannot read {}", a.results.display()))?;
    let lines: Vec<Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .context("not a JSON line")?;
    print!("{}", render(&lines));
    Ok(())
}

fn render(lines: &[Value]) -> String {
    let r = Results(lines);
    let mut out = String::new();
    out.push_str("| bar | measured | met |\n| --- | --- | --- |\n");
    for (bar, measured, met) in r.bar() {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "not measured",
        };
        let _ = writeln!(out, "| {bar} | {measured} | {met} |");
    }
    out.push_str("\n| against the peers (same run) | switchboard | nats-server WS | Node ws | ratio vs nats | ratio vs Node |\n| --- | --- | --- | --- | --- | --- |\n");
    let idle = |t: &str| r.idle(t).and_then(|l| l["rss_per_conn_kib"].as_f64());
    let max = |t: &str| r.max_sustained(t);
    let p99 = |t: &str| {
        r.bar_step(t, 1_000_000)
            .and_then(|l| l["latency_ms"]["p99"].as_f64())
    };
    let rows: [PeerRow<'_>; 3] = [
        (
            "idle RSS per connection (KiB, lower is better)",
            &idle,
            |v| format!("{v:.2}"),
        ),
        ("fanout: highest sustained deliveries/s", &max, |v| {
            format!("{:.2} M", v / 1e6)
        }),
        (
            "fanout p99 at 1 M/s offered (ms, lower is better)",
            &p99,
            |v| format!("{v:.1}"),
        ),
    ];
    for (what, f, fmt) in rows {
        let (ours, nats, node) = (f(SB), f(NATS), f(NODE));
        let cell = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), fmt);
        let ratio = |theirs: Option<f64>| match (ours, theirs) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}×", a / b),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {what} | {} | {} | {} | {} | {} |",
            cell(ours),
            cell(nats),
            cell(node),
            ratio(nats),
            ratio(node)
        );
    }
    out.push_str("\n| scenario | server | load | delivered/s | lost | p50 ms | p99 ms | p99.9 ms | max ms | server CPU % | server RSS MiB | bench CPU % | loadavg 1m |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n");
    for l in lines {
        let _ = writeln!(out, "{}", row(l));
    }
    out
}

/// One measurement as a table row.
fn row(l: &Value) -> String {
    let s = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
    let n = |v: &Value| v.as_f64().map_or_else(|| "–".into(), |x| format!("{x:.1}"));
    let lat = &l["latency_ms"];
    let usage = &l["usage"];
    let scenario = s("scenario");
    let tag = s("tag");
    let load = match scenario.as_str() {
        "idle" => format!(
            "{} conns: {} KiB/conn",
            l["connections"], l["rss_per_conn_kib"]
        ),
        "connect" => format!(
            "HS256 JWT, {} in parallel: {} handshakes/s ({} errors)",
            l["concurrency"],
            int(&l["handshakes_per_s"]),
            l["errors"]
        ),
        "recover" => format!(
            "{} clients back at once, {} behind: all recovered in {} ms (p50 {}, p99 {}, max {} ms; {} failed)",
            l["clients"],
            l["behind"],
            l["all_recovered_ms"],
            l["recover_ms"]["p50"],
            l["recover_ms"]["p99"],
            l["recover_ms"]["max"],
            l["failed"]
        ),
        "send" => format!(
            "{} sends/s to {} users on {} edges via {}",
            l["offered_per_s"],
            l["users"],
            l["edges"],
            s("publish_via")
        ),
        _ => format!(
            "{:.2} M/s offered, {} subs{}, via {}{}",
            l["offered_per_s"].as_f64().unwrap_or(0.0) / 1e6,
            l["subscribers"],
            match l["endpoints"].as_u64() {
                Some(e) if e > 1 => format!(" on {e} edges"),
                _ => String::new(),
            },
            s("publish_via"),
            match l["sustained"].as_bool() {
                Some(false) => " — not sustained",
                _ => "",
            }
        ),
    };
    let load = if usage["bench_cpu_pct"]
        .as_f64()
        .is_some_and(|b| b >= BENCH_SATURATED)
    {
        format!(
            "{load} (load core ≥ {BENCH_SATURATED}% busy: latency includes client-side queueing)"
        )
    } else {
        load
    };
    let name = if tag.is_empty() {
        scenario
    } else {
        format!("{scenario} ({tag})")
    };
    let rss_mib = usage["server_rss_kib"]
        .as_f64()
        .or_else(|| l["rss_after_kib"].as_f64())
        .map_or_else(|| "–".into(), |k| format!("{:.0}", k / 1024.0));
    format!(
        "| {name} | {} | {load} | {} | {} | {} | {} | {} | {} | {} | {rss_mib} | {} | {} |",
        s("target"),
        l["delivered_per_s"]
            .as_f64()
            .map_or_else(|| "–".into(), |d| format!("{d:.0}")),
        l["lost"]
            .as_u64()
            .map_or_else(|| "–".into(), |x| x.to_string()),
        n(&lat["p50"]),
        n(&lat["p99"]),
        n(&lat["p999"]),
        n(&lat["max"]),
        n(&usage["server_cpu_pct"]),
        n(&usage["bench_cpu_pct"]),
        l["loadavg"][0]
            .as_f64()
            .map_or_else(|| "–".into(), |x| format!("{x:.2}")),
    )
}

/// A row of the peers table: what, the figure of one server, how to print it.
type PeerRow<'f> = (
    &'static str,
    &'f dyn Fn(&str) -> Option<f64>,
    fn(f64) -> String,
);

struct Results<'a>(&'a [Value]);

impl<'a> Results<'a> {
    fn find(&self, f: impl Fn(&Value) -> bool) -> Vec<&'a Value> {
        self.0.iter().filter(|l| f(l)).collect()
    }

    fn is(l: &Value, scenario: &str, target: &str) -> bool {
        l["scenario"] == scenario && l["target"] == target
    }

    /// The idle figure of one server process: Switchboard's edge alone when it was
    /// measured (`edge` tag), else whatever was.
    fn idle(&self, target: &str) -> Option<&'a Value> {
        let all = self.find(|l| Self::is(l, "idle", target));
        all.iter()
            .rev()
            .find(|l| l["tag"] == "edge")
            .or(all.last())
            .copied()
    }

    /// Switchboard's single-process (dev) idle figure, beside the edge's.
    fn idle_dev(&self) -> Option<&'a Value> {
        self.find(|l| Self::is(l, "idle", SB) && l["tag"] == "dev")
            .pop()
    }

    /// The fanout step at `rate` offered, from the bar run (else any run).
    fn bar_step(&self, target: &str, rate: u64) -> Option<&'a Value> {
        let at = |l: &Value| Self::is(l, "fanout", target) && l["offered_per_s"] == rate;
        self.find(|l| at(l) && l["tag"] == "bar")
            .pop()
            .or_else(|| self.find(at).pop())
    }

    /// The highest offered fanout rate sustained.
    fn max_sustained(&self, target: &str) -> Option<f64> {
        self.find(|l| Self::is(l, "fanout", target) && l["sustained"] == true)
            .into_iter()
            .filter_map(|l| l["offered_per_s"].as_f64())
            .reduce(f64::max)
    }

    /// (bar, what was measured, met).
    fn bar(&self) -> Vec<(String, String, Option<bool>)> {
        let mut out = Vec::new();
        let idle = self.idle(SB);
        out.push((
            "idle: RSS per connection ≤ 8 KiB".into(),
            idle.map_or_else(String::new, |l| {
                let dev = self.idle_dev().filter(|d| !std::ptr::eq(*d, l));
                format!(
                    "{} KiB ({} connections{}){}",
                    l["rss_per_conn_kib"],
                    l["connections"],
                    if l["tag"] == "edge" {
                        ", edge process"
                    } else {
                        ""
                    },
                    dev.map_or_else(String::new, |d| format!(
                        "; dev mode (edge and coordinator in one process): {} KiB",
                        d["rss_per_conn_kib"]
                    ))
                )
            }),
            idle.and_then(|l| l["rss_per_conn_kib"].as_f64())
                .map(|k| k <= 8.0),
        ));
        let one_m = self.bar_step(SB, 1_000_000);
        let max = self.max_sustained(SB);
        out.push((
            "fanout: ≥ 1.0 M deliveries/s sustained, no loss (2000 subscribers, 100 B)".into(),
            format!(
                "at 1 M/s offered: {} delivered/s, {} lost; highest sustained step: {}",
                one_m.map_or("–".into(), |l| int(&l["delivered_per_s"])),
                one_m.map_or("–".into(), |l| l["lost"].to_string()),
                max.map_or("none".into(), |m| format!("{:.2} M/s", m / 1e6)),
            ),
            one_m.map(|l| l["sustained"] == true || max.is_some_and(|m| m >= 1e6)),
        ));
        let nats = self.max_sustained(NATS);
        out.push((
            "fanout: ≥ 1.0× nats-server's WebSocket listener (highest sustained, same run)".into(),
            match (max, nats) {
                (Some(a), Some(b)) => {
                    format!("{:.2}× ({:.2} M/s vs {:.2} M/s)", a / b, a / 1e6, b / 1e6)
                }
                _ => "–".into(),
            },
            max.zip(nats).map(|(a, b)| a >= b),
        ));
        for (rate, limit) in [(1_000_000u64, 60.0), (20_000, 25.0)] {
            let step = self.bar_step(SB, rate);
            let p99 = step.and_then(|l| l["latency_ms"]["p99"].as_f64());
            out.push((
                format!(
                    "fanout: p99 ≤ {limit} ms at {}",
                    if rate >= 1_000_000 { "1 M/s" } else { "20 k/s" }
                ),
                p99.map_or_else(String::new, |p| format!("{p:.1} ms")),
                p99.map(|p| p <= limit && step.is_some_and(|l| l["lost"] == 0)),
            ));
        }
        let connect = self.find(|l| Self::is(l, "connect", SB)).pop();
        out.push((
            "connect: ≥ 5,000 handshakes/s with HS256 JWT".into(),
            connect.map_or_else(String::new, |l| {
                format!(
                    "{}/s, p99 to `session` {} ms, {} errors",
                    int(&l["handshakes_per_s"]),
                    l["latency_ms"]["p99"],
                    l["errors"]
                )
            }),
            connect
                .and_then(|l| l["handshakes_per_s"].as_f64())
                .map(|h| h >= 5000.0),
        ));
        let send = self
            .find(|l| Self::is(l, "send", SB) && l["tag"] == "grpc")
            .pop();
        out.push((
            "send across 3 edges via gRPC at 1,000/s: p99 ≤ 5 ms".into(),
            send.map_or_else(String::new, |l| {
                format!("p99 {} ms, {} lost", l["latency_ms"]["p99"], l["lost"])
            }),
            send.and_then(|l| l["latency_ms"]["p99"].as_f64())
                .map(|p| p <= 5.0 && send.is_some_and(|l| l["lost"] == 0)),
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_idle_bar_is_judged_on_the_edge_process_and_shows_dev_mode_too() {
        let lines = vec![
            json!({"scenario":"idle","target":"switchboard","tag":"edge","connections":10000,"rss_per_conn_kib":6.0}),
            json!({"scenario":"idle","target":"switchboard","tag":"dev","connections":10000,"rss_per_conn_kib":8.5}),
        ];
        let md = render(&lines);
        assert!(
            md.contains("| idle: RSS per connection ≤ 8 KiB | 6.0 KiB (10000 connections, edge process); dev mode (edge and coordinator in one process): 8.5 KiB | yes |"),
            "{md}"
        );
    }

    #[test]
    fn renders_the_bar_and_ratios() {
        let step = |target: &str, rate: u64, ok: bool, tag: &str| {
            json!({"scenario":"fanout","target":target,"tag":tag,"offered_per_s":rate,
                   "sustained":ok,"lost":0,"delivered_per_s":rate,"subscribers":2000,
                   "latency_ms":{"p50":1.0,"p99":10.0,"p999":20.0,"max":30.0},
                   "usage":{"server_cpu_pct":99.0,"server_rss_kib":10240,"bench_cpu_pct":50.0},
                   "loadavg":[0.5,0.4,0.3]})
        };
        let lines = vec![
            json!({"scenario":"idle","target":"switchboard","connections":10000,"rss_per_conn_kib":6.5}),
            json!({"scenario":"idle","target":"nats-server","connections":10000,"rss_per_conn_kib":13.0}),
            step(SB, 1_000_000, true, "bar"),
            step(SB, 2_000_000, true, "ramp"),
            step(NATS, 1_000_000, true, "ramp"),
            step(NATS, 1_500_000, false, "ramp"),
        ];
        let md = render(&lines);
        assert!(
            md.contains("| idle: RSS per connection ≤ 8 KiB | 6.5 KiB (10000 connections) | yes |"),
            "{md}"
        );
        assert!(md.contains("2.00× (2.00 M/s vs 1.00 M/s) | yes"), "{md}");
        assert!(md.contains("| 0.50× |"), "{md}");
        assert!(md.contains("not measured"), "{md}");
    }
}
