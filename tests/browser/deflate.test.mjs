// permessage-deflate in a real browser: headless Chromium (Debian's chromium, driven by
// playwright-core) opens a WebSocket to a route with `compression: {enabled: true}`, agrees on
// the extension (`ws.extensions`), and receives a topic's fan-out compressed: the edge's
// `edge_bytes_out_total` grows by far less than the messages' size, and Chromium inflates them
// to exactly what was published. A route without compression agrees on nothing.
//
// Self-contained (the binary, a free port, Chromium); every process is stopped by pid and
// every wait is bounded. Never skips: a missing Chromium or binary fails the test.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { existsSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");

const CONFIG = `
edge:
  routes:
    - path: /z
      anonymous: true
      publish: true
      allowed_origins: ["*"]
      compression: { enabled: true, min_size: 64 }
    - path: /plain
      anonymous: true
      publish: true
      allowed_origins: ["*"]
`;

function binary() {
  const candidates = [
    process.env.SWITCHBOARD_BIN,
    process.env.CARGO_TARGET_DIR && join(process.env.CARGO_TARGET_DIR, "debug/switchboard"),
    join(ROOT, "target/debug/switchboard"),
  ].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`no switchboard binary (tried ${candidates.join(", ")}): cargo build -p switchboard`);
  return found;
}

async function until(cond, what, ms = 15000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A free 127.0.0.1 port below 32768, bound to check, then released. */
async function freePort() {
  for (let i = 0; i < 200; i++) {
    const port = 20000 + Math.floor(Math.random() * 12000);
    const s = createServer();
    const ok = await new Promise((r) => {
      s.once("error", () => r(false));
      s.listen(port, "127.0.0.1", () => r(true));
    });
    if (!ok) continue;
    await new Promise((r) => s.close(r));
    return port;
  }
  throw new Error("no free port below 32768");
}

async function startDev() {
  const [ws, grpc, http] = [await freePort(), await freePort(), await freePort()];
  const config = join(mkdtempSync(join(tmpdir(), "sb-deflate-")), "dev.yaml");
  writeFileSync(config, CONFIG);
  const args = ["dev", "--config", config, "--listen", `127.0.0.1:${ws}`, "--grpc-listen", `127.0.0.1:${grpc}`, "--http-listen", `127.0.0.1:${http}`];
  const child = spawn(binary(), args, { env: { ...process.env, RUST_LOG: "warn", NO_COLOR: "1" }, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (out += d));
  const exited = new Promise((r) => child.once("exit", r));
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const t = setTimeout(() => child.kill("SIGKILL"), 15000);
      await exited;
      clearTimeout(t);
    }
  };
  try {
    await until(async () => {
      if (child.exitCode !== null) throw new Error(`switchboard dev exited:\n${out}`);
      try {
        return (await fetch(`http://127.0.0.1:${ws}/readyz`)).ok;
      } catch {
        return false;
      }
    }, "switchboard dev ready");
  } catch (e) {
    await stop();
    throw e;
  }
  return { base: `127.0.0.1:${ws}`, stop };
}

async function bytesOut(base) {
  const text = await (await fetch(`http://${base}/metrics`)).text();
  const line = text.split("\n").find((l) => l.startsWith("edge_bytes_out_total"));
  assert.ok(line, "edge_bytes_out_total in /metrics");
  return Number(line.split(/\s+/)[1]);
}

async function chromium() {
  const { chromium } = await import("playwright-core");
  const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
  if (!existsSync(executablePath)) throw new Error(`no Chromium at ${executablePath}: scripts/test installs Debian's chromium`);
  return chromium.launch({ executablePath, headless: true, args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"] });
}

test("Chromium agrees on permessage-deflate and receives compressed fan-out", async (t) => {
  const dev = await startDev();
  t.after(() => dev.stop());
  const browser = await chromium();
  t.after(() => browser.close());
  const page = await browser.newPage();

  // Two subscribers in the page (the same bytes go to both), and a route without compression.
  const opened = await page.evaluate(async (base) => {
    const open = (path) =>
      new Promise((resolve, reject) => {
        const ws = new WebSocket(`ws://${base}${path}`);
        ws.onopen = () => resolve(ws);
        ws.onerror = () => reject(new Error(`cannot open ${path}`));
      });
    const frames = (ws) => {
      ws.got = [];
      ws.onmessage = (e) => ws.got.push(e.data);
    };
    window.subs = [await open("/z?user=a"), await open("/z?user=b")];
    window.plain = await open("/plain?user=p");
    window.publisher = await open("/plain?user=publisher");
    for (const ws of [...window.subs, window.plain]) {
      frames(ws);
      ws.send(JSON.stringify({ type: "subscribe", topic: "feed", id: 1 }));
    }
    return { z: window.subs.map((ws) => ws.extensions), plain: window.plain.extensions };
  }, dev.base);
  assert.deepEqual(opened.z, [
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
  ]);
  assert.equal(opened.plain, "");
  await until(
    () => page.evaluate(() => [...window.subs, window.plain].every((ws) => ws.got.length === 1)),
    "the three subscriptions",
  );

  // 20 publications of about 2 KiB of JSON records each, from a publisher on the plain route.
  const rows = (i) => Array.from({ length: 30 }, (_, j) => ({ id: i * 100 + j, sku: `SKU-${j}`, status: "active", qty: j % 7 }));
  const payloads = Array.from({ length: 20 }, (_, i) => ({ seq: i, rows: rows(i) }));
  const raw = payloads.reduce((n, p) => n + JSON.stringify({ type: "message", topic: "feed", payload: p }).length, 0);
  const before = await bytesOut(dev.base);
  await page.evaluate((payloads) => {
    for (const payload of payloads) window.publisher.send(JSON.stringify({ type: "publish", topic: "feed", payload }));
  }, payloads);
  await until(
    () => page.evaluate((n) => [...window.subs, window.plain].every((ws) => ws.got.length >= 1 + n), payloads.length),
    "every publication at every subscriber",
  );
  const got = await page.evaluate(() => window.subs.map((ws) => ws.got.slice(1).map((d) => JSON.parse(d))));
  for (const frames of got) {
    assert.deepEqual(
      frames.map((f) => f.payload),
      payloads,
      "Chromium inflated exactly what was published",
    );
  }
  // Out went: the compressed messages to two subscribers, the plain ones to the third (the
  // publisher's `published` answers are not counted in bytes_out).
  const sent = (await bytesOut(dev.base)) - before;
  assert.ok(sent < raw + (2 * raw) / 4, `${sent} bytes out for 3 × ${raw} bytes of messages`);
});
