// The client against the real binary: `switchboard dev` (in-process bus), and its restart.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Switchboard, MonoRail, SwitchboardError } from "../../dist/index.mjs";
import { startDev, grpcurl, until, ROOT } from "../../../../tests/browser/harness.mjs";

const FAST = { minReconnectDelay: 100, maxReconnectDelay: 1000 };

test("dev: subscribe, publish, request, push by type, watch, errors by code", async (t) => {
  const dev = await startDev();
  t.after(() => dev.stop());
  const a = new Switchboard(dev.wsUrl, { ...FAST, params: { user: "alice" } });
  const b = new Switchboard(dev.wsUrl, { ...FAST, params: { user: "bob" } });
  t.after(() => (a.disconnect(), b.disconnect()));
  await Promise.all([a.connect(), b.connect()]);
  assert.ok(a.session);

  const got = [];
  const sub = b.subscribe("chat/+", { onMessage: (p, m) => got.push([m.topic, p]) });
  await until(() => sub.state === "subscribed", "subscribed");
  const published = await a.publish("chat/room1", { text: "hi" });
  assert.equal(published.type, "published");
  await until(() => got.length === 1, "message");
  assert.deepEqual(got[0], ["chat/room1", { text: "hi" }]);

  // An event nobody listens to: rejected with the edge's code.
  await assert.rejects(a.request("chat.hello", { text: "hi" }), (e) => e instanceof SwitchboardError && e.code === "no_responders");
  await assert.rejects(a.publish("chat/+", 1), (e) => e.code === "invalid_topic");

  // A backend's Send, by type.
  const notices = [];
  a.handle("notice", (p) => notices.push(p));
  await grpcurl(`127.0.0.1:${dev.grpc}`, "switchboard.v1.Messaging/Send", { namespace: "default", user: "alice", type: "notice", payload: { n: 1 } });
  await until(() => notices.length === 1, "send");
  assert.deepEqual(notices[0], { n: 1 });

  // A watch of the dev route's `notes` resource through call().
  const list = await a.call({ type: "watch", resource: "notes", params: {} });
  assert.equal(list.type, "list");
  const items = [];
  a.handle("item", (_, f) => items.push(f.data));
  await grpcurl(`127.0.0.1:${dev.grpc}`, "switchboard.v1.Resources/Put", { resource: "notes", item: { id: "n1", text: "x" } });
  await until(() => items.length === 1, "watched item");
  assert.equal(items[0].id, "n1");

  sub.unsubscribe();
  await a.publish("chat/room1", { text: "after" });
  const pong = await b.call({ type: "ping" });
  assert.equal(pong.type, "pong");
  assert.equal(got.length, 1, "nothing after unsubscribe");
});

test("dev restart: the client sees the drain (1001), backs off while the port is closed, reconnects and resubscribes", async (t) => {
  let dev = await startDev();
  t.after(() => dev.stop());
  const sb = new Switchboard(dev.wsUrl, { ...FAST, params: { user: "carol" } });
  t.after(() => sb.disconnect());
  const closes = [];
  const attempts = [];
  sb.on("disconnected", (i) => closes.push(i));
  sb.on("connecting", (i) => attempts.push(i));
  const got = [];
  const sub = sb.subscribe("news", { onMessage: (p) => got.push(p) });
  await sb.connect();
  await until(() => sub.state === "subscribed", "subscribed");
  const { ws, grpc } = dev;
  await dev.stop();
  await until(() => closes.length === 1, "drain close");
  assert.equal(closes[0].code, 1001);
  assert.equal(closes[0].reason, "server shutting down");
  await until(() => attempts.length >= 4, "failed attempts while down");
  dev = await startDev({ ws, grpc });
  await until(() => sb.state === "connected" && sub.state === "subscribed", "reconnected and resubscribed", 15000);
  await grpcurl(`127.0.0.1:${grpc}`, "switchboard.v1.Messaging/Publish", { namespace: "default", topic: "news", payload: "after restart" });
  await until(() => got.length === 1, "message after the restart");
  // Backoff: the delays of the failed attempts grow (full jitter: bounded by base·2^n).
  const delays = attempts.map((a) => a.delay).filter((d) => d !== undefined);
  delays.slice(2).forEach((d, i) => assert.ok(d < Math.min(1000, 100 * 2 ** (i + 1)) + 1, `delay ${d}`));
});

test("MonoRail client on a monorail route (deploy/examples/monorail.yaml): the seed's flow", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sb-monorail-"));
  const config = join(dir, "monorail.yaml");
  const { readFileSync } = await import("node:fs");
  writeFileSync(config, readFileSync(join(ROOT, "deploy/examples/monorail.yaml"), "utf8"));
  let dev = await startDev({ config });
  t.after(() => dev.stop());
  const g = `127.0.0.1:${dev.grpc}`;
  await grpcurl(g, "switchboard.v1.Resources/Put", { resource: "nodes", item: { id: "n1", rack: "r1" } });
  await grpcurl(g, "switchboard.v1.Resources/Put", { resource: "nodes", item: { id: "n2", rack: "r2" } });
  const client = new MonoRail(`ws://127.0.0.1:${dev.ws}/rack`, FAST);
  t.after(() => client.disconnect());
  const seen = { list: [], item: [], remove: [] };
  for (const h of Object.keys(seen)) client.events.on(h, (f) => seen[h].push(f));
  const session = await new Promise((r) => client.init(r));
  assert.ok(session);
  client.all("nodes");
  await until(() => seen.list.length === 1, "all");
  assert.equal(seen.list[0].items.length, 2);
  client.query("nodes", { rack: "r1" });
  await until(() => seen.list.length === 2, "query");
  assert.deepEqual(seen.list[1].items.map((i) => i.id), ["n1"]);
  client.get("nodes", { id: "n2" });
  await until(() => seen.item.length === 1, "get");
  assert.equal(seen.item[0].data.rack, "r2");
  client.watch("nodes", { rack: "r1" });
  await until(() => seen.list.length === 3, "watch list");
  await grpcurl(g, "switchboard.v1.Resources/Put", { resource: "nodes", item: { id: "n3", rack: "r1" } });
  await until(() => seen.item.some((f) => f.data.id === "n3"), "watched item");
  await grpcurl(g, "switchboard.v1.Resources/Delete", { resource: "nodes", id: "n3" });
  await until(() => seen.remove.some((f) => f.params.id === "n3"), "watched remove");

  // Reconnect after a restart: the same session is named again, the watch answers a fresh list.
  const { ws, grpc } = dev;
  await dev.stop();
  dev = await startDev({ config, ws, grpc });
  const sessions = [];
  client.events.on("session", (f) => sessions.push(f.id));
  await until(() => seen.list.length === 4, "watch re-sent after the restart", 15000);
  await until(() => sessions.length === 1, "session named again");
  assert.equal(sessions[0], session);
  client.stop("nodes", { rack: "r1" });
  client.all("nodes"); // answered after the stop: the stop was handled
  await until(() => seen.list.length === 5, "all after stop");
  const before = seen.item.length;
  await grpcurl(`127.0.0.1:${grpc}`, "switchboard.v1.Resources/Put", { resource: "nodes", item: { id: "n4", rack: "r1" } });
  client.get("nodes", { id: "n4" });
  await until(() => seen.item.length === before + 1, "get n4");
  assert.equal(seen.item.length, before + 1, "no watch item after stop, only the get's");
});

test("dev with history: a backend's hard Disconnect, publications while away, resume and recovery", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "sb-hist-"));
  const config = join(dir, "dev.yaml");
  writeFileSync(
    config,
    `edge:
  routes:
    - path: /connect
      anonymous: true
      publish: true
      history:
        - { topics: "chat/#", size: 100, ttl: 5m }
`,
  );
  const dev = await startDev({ config });
  t.after(() => dev.stop());
  const g = `127.0.0.1:${dev.grpc}`;
  // The first retry waits ~1.5 s (random fixed): the window the publications below fall in.
  const sb = new Switchboard(dev.wsUrl, { params: { user: "frank" }, minReconnectDelay: 1500, random: () => 0.99 });
  t.after(() => sb.disconnect());
  const got = [];
  const sub = sb.subscribe("chat/ops", { onMessage: (p, m) => got.push([p, m.offset]) });
  const connected = [];
  sb.on("connected", (c) => connected.push(c));
  const ctxs = [];
  sub.on("subscribed", (c) => ctxs.push(c));
  await sb.connect();
  await until(() => sub.state === "subscribed", "subscribed");
  assert.ok(ctxs[0].epoch, "a history topic's subscribed has an epoch");
  const pub = (n) => grpcurl(g, "switchboard.v1.Messaging/Publish", { namespace: "default", topic: "chat/ops", payload: n });
  await pub(1);
  await until(() => got.length === 1, "live");
  const closes = [];
  sb.on("disconnected", (i) => closes.push(i));
  await grpcurl(g, "switchboard.v1.Messaging/Disconnect", { namespace: "default", user: "frank", hard: true });
  await until(() => closes.length === 1, "dropped");
  for (const n of [2, 3, 4]) await pub(n);
  await until(() => sb.state === "connected" && got.length === 4, "resumed and recovered", 15000);
  await pub(5);
  await until(() => got.length === 5, "live again");
  assert.deepEqual(got.map(([p]) => p), [1, 2, 3, 4, 5]);
  const offsets = got.map(([, o]) => o);
  assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b));
  assert.equal(connected.at(-1).resumed, true, "the same process accepts its resume token");
  assert.equal(ctxs.at(-1).recovered, true);
  assert.equal(ctxs.at(-1).resumed, true, "restored by the token, not resubscribed");
  assert.equal(sub.duplicates, 0);
});
