// Processes for JavaScript tests against the real binary: `switchboard dev` (in-process bus or
// over NATS), nats-server with JetStream, grpcurl calls, headless Chromium. No dependencies
// but playwright-core (for `chromium()` only), so clients/js's integration tests share it.
//
// Every process started here is stopped by `stop()` (its pid, never by name); ports are
// 127.0.0.1 and found free by binding port 0. Waits are bounded polls (`until`).
import { spawn, execFile } from "node:child_process";
import { createServer } from "node:net";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

/** The switchboard binary: $SWITCHBOARD_BIN, else $CARGO_TARGET_DIR/debug, else target/debug. */
export function binary() {
  const candidates = [
    process.env.SWITCHBOARD_BIN,
    process.env.CARGO_TARGET_DIR && join(process.env.CARGO_TARGET_DIR, "debug/switchboard"),
    join(ROOT, "target/debug/switchboard"),
  ].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`no switchboard binary (tried ${candidates.join(", ")}): run cargo build -p switchboard`);
  return found;
}

export async function until(cond, what = "condition", ms = 10000, every = 20) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, every));
  }
}

/** A free 127.0.0.1 port (bound, then released). */
export async function freePort() {
  const s = createServer();
  await new Promise((r) => s.listen(0, "127.0.0.1", r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

/** A child process whose output is kept (for `waitFor`) and which is stopped by pid. */
export class Proc {
  constructor(name, cmd, args, env = {}) {
    this.name = name;
    this.out = "";
    this.child = spawn(cmd, args, { env: { ...process.env, NO_COLOR: "1", ...env }, stdio: ["ignore", "pipe", "pipe"] });
    this.exited = new Promise((r) => this.child.once("exit", (code, signal) => r({ code, signal })));
    this.child.stdout.on("data", (d) => (this.out += d));
    this.child.stderr.on("data", (d) => (this.out += d));
  }
  async waitFor(re, ms = 15000) {
    return until(() => this.out.match(re), `${this.name} to print ${re}\n--- output ---\n${this.out.slice(-2000)}`, ms);
  }
  /** SIGTERM (the edge drains: 1001 to its clients), then SIGKILL after `ms`. */
  async stop(ms = 15000) {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.exited;
    this.child.kill("SIGTERM");
    const t = setTimeout(() => this.child.kill("SIGKILL"), ms);
    const r = await this.exited;
    clearTimeout(t);
    return r;
  }
}

/** nats-server with JetStream on a free port, its store in a temporary directory. */
export async function startNats() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "sb-nats-"));
  const p = new Proc("nats-server", "nats-server", ["-a", "127.0.0.1", "-p", String(port), "-js", "-sd", dir]);
  await p.waitFor(/Server is ready/);
  p.url = `nats://127.0.0.1:${port}`;
  p.port = port;
  const stop = p.stop.bind(p);
  p.stop = async () => {
    await stop();
    rmSync(dir, { recursive: true, force: true });
  };
  return p;
}

/**
 * `switchboard dev` on free ports (or the given ones, to restart on the same address).
 * Options: nats (URL), config (file), ws / grpc ports, env.
 */
export async function startDev({ nats, config, ws, grpc, env = {} } = {}) {
  ws ??= await freePort();
  grpc ??= await freePort();
  const args = ["dev", "--listen", `127.0.0.1:${ws}`, "--grpc-listen", `127.0.0.1:${grpc}`];
  if (nats) args.push("--nats", nats);
  if (config) args.push("--config", config);
  const p = new Proc("switchboard dev", binary(), args, { RUST_LOG: "warn", ...env });
  await p.waitFor(/demo\s+http:\/\//);
  await until(async () => {
    try {
      return (await fetch(`http://127.0.0.1:${ws}/readyz`)).ok;
    } catch {
      return false;
    }
  }, "switchboard dev ready");
  Object.assign(p, { ws, grpc, http: `http://127.0.0.1:${ws}`, wsUrl: `ws://127.0.0.1:${ws}/connect` });
  return p;
}

/** Calls a gRPC method with grpcurl (plaintext); resolves with the parsed JSON answer. */
export function grpcurl(addr, method, body) {
  return new Promise((resolve, reject) => {
    execFile("grpcurl", ["-plaintext", "-d", JSON.stringify(body), addr, method], { timeout: 15000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`grpcurl ${method}: ${err.message}\n${stderr}`));
      try {
        resolve(stdout.trim() ? JSON.parse(stdout) : {});
      } catch (e) {
        reject(new Error(`grpcurl ${method} answered ${stdout}: ${e.message}`));
      }
    });
  });
}

/** Headless Debian Chromium through playwright-core (never a downloaded browser). */
export async function chromium() {
  const { chromium } = await import("playwright-core");
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  if (!existsSync(executablePath)) throw new Error(`no Chromium at ${executablePath}: scripts/test installs Debian's chromium`);
  return chromium.launch({ executablePath, headless: true, args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"] });
}

/** Where test artifacts (screenshots) go: $ARTIFACTS_DIR, else target/js-artifacts. */
export function artifactsDir() {
  return process.env.ARTIFACTS_DIR || join(process.env.CARGO_TARGET_DIR || join(ROOT, "target"), "js-artifacts");
}
