// The demo page of `switchboard dev` in headless Chromium: it connects, receives a gRPC Send
// and a publication, watches a resource, survives a restart of the server (backing off while
// the port is closed) and recovers the chat messages published while it was away.
//
// The server runs over NATS with JetStream (`--nats`) so that the chat topic's history outlives
// the process; the messages "missed" are published on the history subject while no
// switchboard process runs at all.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tcp } from "node:net";
import { artifactsDir, chromium, grpcurl, startDev, startNats, until } from "./harness.mjs";

/** The dev route of `switchboard dev` plus history on chat/# (docs/PROTOCOL.md, history). */
const CONFIG = `
edge:
  routes:
    - path: /connect
      anonymous: true
      publish: true
      allowed_origins: ["*"]
      resources:
        notes: { kind: kv }
      history:
        - topics: "chat/#"
          size: 100
          ttl: 5m
          read: true
`;

/** A bare NATS publish (what a backend with only a NATS client does), confirmed by PING/PONG. */
async function natsPublish(url, subject, payload) {
  const { hostname, port } = new URL(url);
  const sock = tcp({ host: hostname, port: Number(port) });
  let buf = "";
  sock.on("data", (d) => (buf += d));
  await until(() => buf.includes("INFO"), "nats INFO", 5000);
  const body = Buffer.from(JSON.stringify(payload));
  sock.write(`CONNECT {"verbose":false,"pedantic":false}\r\nPUB ${subject} ${body.length}\r\n${body}\r\nPING\r\n`);
  await until(() => buf.includes("PONG"), "nats PONG", 5000);
  sock.destroy();
}

test("the demo page: Send, publish, watch, restart with backoff, recovery of missed messages", async (t) => {
  const nats = await startNats();
  t.after(() => nats.stop());
  const config = join(mkdtempSync(join(tmpdir(), "sb-demo-")), "dev.yaml");
  writeFileSync(config, CONFIG);
  let dev = await startDev({ nats: nats.url, config });
  t.after(() => dev.stop());
  const grpc = `127.0.0.1:${dev.grpc}`;

  const browser = await chromium();
  t.after(() => browser.close());
  const context = await browser.newContext({ viewport: { width: 1200, height: 760 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${dev.http}/?user=alice&minDelay=250&maxDelay=2000`);
  const demo = (expr) => page.evaluate(expr);
  await page.waitForFunction(() => window.demo?.sb.state === "connected" && window.demo.sub.state === "subscribed");
  assert.equal(await page.textContent("#state"), "connected");

  // A backend's Send to this user, a publication on the chat topic, a resource item.
  await grpcurl(grpc, "switchboard.v1.Messaging/Send", { namespace: "default", user: "alice", type: "notice", payload: { text: "hello from gRPC Send" } });
  await page.waitForSelector("#pushes li:has-text('hello from gRPC Send')");
  await grpcurl(grpc, "switchboard.v1.Messaging/Publish", { namespace: "default", topic: "chat/lobby", payload: { from: "backend", text: "published over gRPC" } });
  await page.waitForSelector("#messages li:has-text('published over gRPC')");
  await grpcurl(grpc, "switchboard.v1.Resources/Put", { resource: "notes", item: { id: "n1", text: "a watched note" } });
  await page.waitForSelector("#notes li:has-text('a watched note')");
  await page.fill("#text", "typed in the page");
  await page.click("#say button");
  await page.waitForSelector("#messages li:has-text('typed in the page')");
  const before = await demo(() => window.demo.messages.map((m) => m.offset));
  assert.ok(before.every((o) => typeof o === "number"), `history offsets on every message: ${before}`);

  // The browser going offline: the page drops its socket at once and waits for `online`.
  await context.setOffline(true);
  await page.waitForFunction(() => window.demo.sb.state !== "connected");
  assert.match(await page.textContent("#log"), /browser offline/);
  await context.setOffline(false);
  await page.waitForFunction(() => window.demo.sb.state === "connected" && window.demo.reconnects === 1, null, { timeout: 10000 });

  // Restart: SIGTERM drains (1001); while nothing listens the page retries with backoff.
  const { ws, grpc: grpcPort } = dev;
  await dev.stop();
  await page.waitForFunction(() => window.demo.sb.state === "connecting" && window.demo.sb.attempt >= 2, null, { timeout: 20000 });
  const closeLog = await page.textContent("#log");
  assert.match(closeLog, /closed 1001 server shutting down/);
  for (const text of ["missed one", "missed two", "missed three"])
    await natsPublish(nats.url, "sb.hist.default.chat.lobby", { from: "while-away", text });
  dev = await startDev({ nats: nats.url, config, ws, grpc: grpcPort });
  await page.waitForFunction(() => window.demo.sb.state === "connected" && window.demo.reconnects === 2, null, { timeout: 20000 });
  await page.waitForSelector("#messages li:has-text('missed three')", { timeout: 15000 });
  const after = await demo(() => window.demo.messages.map((m) => [m.offset, m.payload.text]));
  assert.deepEqual(after.slice(-3).map(([, text]) => text), ["missed one", "missed two", "missed three"]);
  const offsets = after.map(([o]) => o);
  assert.deepEqual(offsets, [...new Set(offsets)].sort((a, b) => a - b), "each offset once, in order");
  assert.equal(await demo(() => window.demo.recovered), true);
  assert.match(await page.textContent("#recovery"), /recovered missed messages/);

  // And live again after the restart.
  await grpcurl(`127.0.0.1:${grpcPort}`, "switchboard.v1.Messaging/Publish", { namespace: "default", topic: "chat/lobby", payload: { from: "backend", text: "live after the restart" } });
  await page.waitForSelector("#messages li:has-text('live after the restart')");
  assert.deepEqual(errors, []);

  const dir = artifactsDir();
  mkdirSync(dir, { recursive: true });
  const shot = join(dir, "demo-page.png");
  await page.screenshot({ path: shot, fullPage: true });
  console.log(`screenshot: ${shot}`);
});
