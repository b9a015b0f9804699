// Processes for JavaScript tests against the real binary: `switchboard dev` (in-process bus or
// over NATS), nats-server with JetStream, grpcurl calls, headless Chromium. No dependencies
// but playwright-core (for `chromium()` only), so clients/js's integration tests share it.
//
// Every process started here is stopped by `stop()` (its pid, never by name); ports are
// 127.0.0.1, below 32768, and found free by binding them. Waits are bounded polls (`until`).
import { spawn, execFile } from "node:child_process";
import { createServer } from "node:net";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createHmac } from "node:crypto";
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

const handedOut = new Set();

/**
 * A free 127.0.0.1 port below 32768 (outside the ephemeral range, so no outgoing connection
 * takes it meanwhile), bound to check, then released; never the same one twice per process.
 */
export async function freePort() {
  for (let i = 0; i < 200; i++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    if (handedOut.has(port)) continue;
    const s = createServer();
    const ok = await new Promise((r) => {
      s.once("error", () => r(false));
      s.listen(port, "127.0.0.1", () => r(true));
    });
    if (!ok) continue;
    await new Promise((r) => s.close(r));
    handedOut.add(port);
    return port;
  }
  throw new Error("no free port below 32768");
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
export function grpcurl(addr, method, body, { key } = {}) {
  const auth = key ? ["-H", `authorization: Bearer ${key}`] : [];
  return new Promise((resolve, reject) => {
    execFile("grpcurl", [...auth, "-plaintext", "-d", JSON.stringify(body), addr, method], { timeout: 15000 }, (err, stdout, stderr) => {
      if (err) return reject(new Error(`grpcurl ${method}: ${err.message}\n${stderr}`));
      try {
        resolve(stdout.trim() ? JSON.parse(stdout) : {});
      } catch (e) {
        reject(new Error(`grpcurl ${method} answered ${stdout}: ${e.message}`));
      }
    });
  });
}

/** An HS256 JWT (what `switchboard token` mints): `claims` plus `exp` in `ttl` seconds. */
export function hs256(secret, claims, ttl = 300) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ exp: Math.floor(Date.now() / 1000) + ttl, ...claims })}`;
  return `${body}.${createHmac("sha256", secret).update(body).digest("base64url")}`;
}

/**
 * deploy/local/cluster.sh on free ports in a temporary CLUSTER_DIR: nats-server, two
 * coordinators, three edges, haproxy. `down()` stops exactly what it started.
 */
export async function startCluster({ edgeConfig, secret = "js-test-secret" } = {}) {
  const dir = mkdtempSync(join(tmpdir(), "sb-cluster-"));
  const ports = [];
  for (let i = 0; i < 10; i++) ports.push(await freePort());
  const env = {
    ...process.env,
    CLUSTER_DIR: dir,
    NATS_PORT: String(ports[0]),
    NATS_MONITOR_PORT: String(ports[1]),
    COORDINATOR_PORTS: `${ports[2]} ${ports[3]}`,
    COORDINATOR_HTTP_PORTS: `${ports[4]} ${ports[5]}`,
    EDGE_PORTS: `${ports[6]} ${ports[7]} ${ports[8]}`,
    LB_PORT: String(ports[9]),
    SWITCHBOARD_BIN: binary(),
    SWITCHBOARD_JWT_SECRET: secret,
    RUST_LOG: "warn",
  };
  if (edgeConfig) {
    env.EDGE_CONFIG = join(dir, "edge-given.yaml");
    writeFileSync(env.EDGE_CONFIG, edgeConfig);
  }
  const script = join(ROOT, "deploy/local/cluster.sh");
  const run = (cmd) =>
    new Promise((resolve, reject) =>
      execFile(script, [cmd], { env, timeout: 120000 }, (err, stdout, stderr) =>
        err ? reject(new Error(`cluster.sh ${cmd}: ${err.message}\n${stdout}\n${stderr}`)) : resolve(stdout),
      ),
    );
  try {
    await run("up");
  } catch (e) {
    await run("down").catch(() => {});
    throw e;
  }
  return {
    dir,
    secret,
    lb: `ws://127.0.0.1:${ports[9]}/connect`,
    grpc: `127.0.0.1:${ports[2]}`,
    edges: [ports[6], ports[7], ports[8]],
    key: readFileSync(join(dir, "api-key"), "utf8").trim(),
    natsUrl: `nats://127.0.0.1:${ports[0]}`,
    /** The pid cluster.sh recorded for a process (`edge-1`…). */
    pid: (name) => Number(readFileSync(join(dir, "run", `${name}.pid`), "utf8").trim()),
    down: async () => {
      await run("down");
      rmSync(dir, { recursive: true, force: true });
    },
  };
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
