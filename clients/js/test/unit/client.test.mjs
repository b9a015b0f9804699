// The native client against a scripted fake edge (test/unit/fake.mjs).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Switchboard, SwitchboardError, fullJitter, classifyClose, topicMatches } from "../../dist/index.mjs";
import { FakeServer, defaultAnswers, until, FAST } from "./fake.mjs";

test("full jitter stays within [0, min(max, base·2^n)) and spreads", () => {
  for (let n = 0; n < 12; n++) {
    const cap = Math.min(20000, 500 * 2 ** n);
    assert.equal(fullJitter(n, 500, 20000, () => 0), 0);
    assert.ok(fullJitter(n, 500, 20000, () => 0.999999) < cap);
    assert.ok(fullJitter(n, 500, 20000, () => 0.999999) >= cap - 1);
  }
  const seen = new Set();
  for (let i = 0; i < 200; i++) seen.add(Math.floor(fullJitter(5, 500, 20000, Math.random) / 1000));
  assert.ok(seen.size > 10, "delays spread over the whole range");
});

test("close codes: drain, terminal, pause, refresh, retry", () => {
  assert.equal(classifyClose(1001, "server shutting down"), "drain");
  for (const c of [1003, 1007, 1009, 4003]) assert.equal(classifyClose(c, ""), "terminal");
  assert.equal(classifyClose(1008, "connection refused"), "terminal");
  assert.equal(classifyClose(1008, "rate limit exceeded"), "pause");
  assert.equal(classifyClose(1013, "slow consumer"), "pause");
  assert.equal(classifyClose(4001, "token expired"), "refresh");
  assert.equal(classifyClose(1006, ""), "retry");
  assert.equal(classifyClose(1000, "idle timeout"), "retry");
});

test("MQTT filters", () => {
  assert.ok(topicMatches("chat/+", "chat/a"));
  assert.ok(!topicMatches("chat/+", "chat/a/b"));
  assert.ok(topicMatches("chat/#", "chat"));
  assert.ok(topicMatches("chat/#", "chat/a/b"));
  assert.ok(!topicMatches("chat/a", "chat/b"));
  assert.ok(topicMatches("+/+", "a/b"));
});

test("connect, subscribe, message, publish and request by id, push handlers", async (t) => {
  const server = await new FakeServer((c, f) => {
    if (f.type === "echo.me") return c.send({ type: "echo.me", id: f.id, payload: { got: f.payload } });
    if (f.type === "fail.me") return c.send({ type: "error", id: f.id, payload: { why: "no" } });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, { ...FAST, params: { user: "alice" } });
  t.after(() => sb.disconnect());
  const states = [];
  sb.on("state", (s) => states.push(s));
  await sb.connect();
  assert.equal(sb.session, "s0");
  assert.match(server.last.url, /user=alice/);
  const got = [];
  const sub = sb.subscribe("chat/+", { onMessage: (p) => got.push(p) });
  await until(() => sub.state === "subscribed", "subscribed");
  server.last.send({ type: "message", topic: "chat/a", payload: 1 });
  server.last.send({ type: "message", topic: "other", payload: 2 });
  await until(() => got.length === 1, "message");
  assert.deepEqual(await sb.request("echo.me", { x: 1 }), { got: { x: 1 } });
  await assert.rejects(sb.request("fail.me"), (e) => e instanceof SwitchboardError && e.code === "backend_error" && e.payload.why === "no");
  await assert.rejects(sb.request("nobody.answers", null, { timeout: 50 }), (e) => e.code === "timeout");
  const published = await sb.publish("chat/a", { text: "hi" });
  assert.equal(published.type, "published");
  const pushed = [];
  sb.handle("chat", (p) => pushed.push(p));
  server.last.send({ type: "chat", payload: { text: "from backend" } });
  await until(() => pushed.length === 1, "push");
  assert.deepEqual(states, ["connecting", "connected"]);
  assert.throws(() => sb.subscribe("chat/+"), /already subscribed/);
});

test("reconnect resubscribes from the last position and never delivers an offset twice", async (t) => {
  // A history topic: subscribed carries epoch and offset; with since, replay from there.
  const log = [{ offset: 10, payload: "a" }, { offset: 12, payload: "b" }];
  const server = await new FakeServer((c, f) => {
    if (f.type === "init") return c.send({ type: "session", id: `s${c.n}` }); // no resume token
    if (f.type === "subscribe") {
      const last = log[log.length - 1].offset;
      if (!f.since) return c.send({ type: "subscribed", id: f.id, topic: f.topic, epoch: "E", offset: last });
      c.send({ type: "subscribed", id: f.id, topic: f.topic, epoch: "E", offset: last, recovered: true });
      // A replay that overlaps what the client already has: the client drops the overlap.
      for (const m of log) if (m.offset >= f.since.offset) c.send({ type: "message", topic: f.topic, ...m });
      return;
    }
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  const got = [];
  const subscribed = [];
  const sub = sb.subscribe("chat/a", { onMessage: (p, m) => got.push(m.offset) });
  sub.on("subscribed", (ctx) => subscribed.push(ctx));
  await sb.connect();
  await until(() => sub.state === "subscribed", "subscribed");
  assert.deepEqual(sub.position(), { offset: 12, epoch: "E" });
  server.last.send({ type: "message", topic: "chat/a", offset: 15, payload: "c" });
  log.push({ offset: 15, payload: "c" });
  await until(() => got.length === 1, "live message");
  log.push({ offset: 16, payload: "d" }, { offset: 20, payload: "e" }); // missed while away
  server.last.ws.terminate();
  await until(() => server.conns.length === 2 && sub.state === "subscribed", "resubscribed");
  await until(() => got.length === 3, "recovered messages");
  assert.deepEqual(got, [15, 16, 20]);
  assert.equal(sub.duplicates, 1, "offset 15 came again in the replay and was dropped");
  const resub = server.last.frames("subscribe")[0];
  assert.deepEqual(resub.since, { offset: 15, epoch: "E" });
  assert.equal(subscribed.at(-1).recovered, true);
  assert.equal(subscribed.at(-1).recovering, true);
  assert.deepEqual(sub.position(), { offset: 20, epoch: "E" });
});

test("a connection lost mid-replay recovers the rest (subscribed.offset not trusted until replayed)", async (t) => {
  let conns = 0;
  const server = await new FakeServer((c, f) => {
    if (f.type === "subscribe" && f.since) {
      conns++;
      c.send({ type: "subscribed", id: f.id, topic: f.topic, epoch: "E", offset: 9, recovered: true });
      if (conns === 1) {
        c.send({ type: "message", topic: f.topic, offset: 6, payload: 6 });
        return c.ws.terminate(); // 7..9 never arrive on this connection
      }
      for (const o of [7, 8, 9]) if (o > f.since.offset) c.send({ type: "message", topic: f.topic, offset: o, payload: o });
      return;
    }
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, { ...FAST, resume: false });
  t.after(() => sb.disconnect());
  const got = [];
  const sub = sb.subscribe("chat/a", { onMessage: (p) => got.push(p), since: { offset: 5, epoch: "E" } });
  await sb.connect();
  await until(() => got.length === 4, "all of 6..9");
  assert.deepEqual(got, [6, 7, 8, 9]);
  assert.deepEqual(server.last.frames("subscribe")[0].since, { offset: 6, epoch: "E" });
  assert.deepEqual(sub.position(), { offset: 9, epoch: "E" });
});

test("recovery that fails is surfaced (recovered:false), and a gap frame too", async (t) => {
  const server = await new FakeServer((c, f) => {
    if (f.type === "subscribe") return c.send({ type: "subscribed", id: f.id, topic: f.topic, epoch: "E2", offset: 100, recovered: false });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  const sub = sb.subscribe("chat/a", { since: { offset: 3, epoch: "E1" } });
  const ctxs = [];
  const gaps = [];
  sub.on("subscribed", (x) => ctxs.push(x));
  sub.on("gap", (g) => gaps.push(g));
  await sb.connect();
  await until(() => ctxs.length === 1, "subscribed");
  assert.equal(ctxs[0].recovered, false);
  assert.equal(ctxs[0].recovering, true);
  assert.equal(sub.recovered, false);
  assert.deepEqual(sub.position(), { offset: 100, epoch: "E2" });
  server.last.send({ type: "gap", topic: "chat/a", epoch: "E2", offset: 140 });
  await until(() => gaps.length === 1, "gap");
  assert.deepEqual(sub.position(), { offset: 139, epoch: "E2" });
});

test("resume: ?resume= and init{resume, positions}; resumed:true restores without resubscribing", async (t) => {
  const server = await new FakeServer((c, f) => {
    if (f.type === "init" && f.resume) {
      c.send({ type: "session", id: "s-again", resumed: true, resume: "tok-new" });
      // The server restores the token's subscriptions, recovering from the given positions.
      return c.send({ type: "subscribed", topic: "chat/a", epoch: "E", offset: 7, recovered: true, resume: "tok-new2" });
    }
    if (f.type === "subscribe") return c.send({ type: "subscribed", id: f.id, topic: f.topic, epoch: "E", offset: 7, resume: "tok-sub" });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  const sub = sb.subscribe("chat/a");
  const ctxs = [];
  sub.on("subscribed", (x) => ctxs.push(x));
  await sb.connect();
  await until(() => sub.state === "subscribed", "subscribed");
  server.last.ws.terminate();
  await until(() => server.conns.length === 2 && ctxs.length === 2, "restored");
  const c2 = server.last;
  assert.match(c2.url, /resume=tok-sub/);
  assert.deepEqual(c2.received[0], { type: "init", resume: "tok-sub", positions: { "chat/a": { offset: 7, epoch: "E" } } });
  assert.equal(c2.frames("subscribe").length, 0, "nothing resubscribed: the token restored it");
  assert.equal(ctxs[1].resumed, true);
  assert.equal(sub.state, "subscribed");
  // The next reconnect carries the newest token.
  c2.ws.terminate();
  await until(() => server.conns.length === 3, "third connection");
  await until(() => server.last.received.length > 0, "init");
  assert.equal(server.last.received[0].resume, "tok-new2");
});

test("resume refused (resumed:false): the client resubscribes itself", async (t) => {
  const server = await new FakeServer((c, f) => {
    if (f.type === "init") return c.send({ type: "session", id: `s${c.n}`, resumed: f.resume ? false : undefined, resume: `t${c.n}` });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  const sub = sb.subscribe("news");
  await sb.connect();
  await until(() => sub.state === "subscribed", "subscribed");
  server.last.ws.terminate();
  await until(() => server.conns.length === 2 && server.last.frames("subscribe").length === 1, "resubscribe");
  await until(() => sub.state === "subscribed", "subscribed again");
});

test("subscribe then unsubscribe before the answer: the late answer is undone, nothing delivered", async (t) => {
  const held = [];
  const server = await new FakeServer((c, f) => {
    if (f.type === "subscribe") return held.push(f); // answered later
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  await sb.connect();
  const got = [];
  const sub = sb.subscribe("chat/a", { onMessage: (p) => got.push(p) });
  await until(() => held.length === 1, "subscribe sent");
  sub.unsubscribe();
  assert.equal(sub.state, "unsubscribed");
  const sub2 = sb.subscribe("chat/a"); // a new subscription to the same filter is independent
  await until(() => held.length === 2, "second subscribe sent");
  server.last.send({ type: "subscribed", id: held[0].id, topic: "chat/a" });
  server.last.send({ type: "message", topic: "chat/a", payload: 1 });
  server.last.send({ type: "subscribed", id: held[1].id, topic: "chat/a" });
  await until(() => sub2.state === "subscribed", "second subscribed");
  assert.deepEqual(got, []);
  const order = server.last.received.filter((f) => f.type === "subscribe" || f.type === "unsubscribe").map((f) => f.type);
  assert.deepEqual(order, ["subscribe", "unsubscribe", "subscribe"]);
});

test("drain (1001) reconnects soon with the backoff reset; terminal codes do not reconnect", async (t) => {
  const server = await new FakeServer().start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, { ...FAST, drainDelay: 30, minReconnectDelay: 5000, maxReconnectDelay: 60000 });
  t.after(() => sb.disconnect());
  const closes = [];
  sb.on("disconnected", (i) => closes.push(i));
  await sb.connect();
  server.last.close(1001, "server shutting down");
  await until(() => closes.length === 1, "disconnected");
  assert.equal(closes[0].reconnect, true);
  assert.ok(closes[0].delay < 30, `drain delay ${closes[0].delay}`);
  await until(() => sb.state === "connected" && server.conns.length === 2, "reconnected");
  server.last.close(4003, "token revoked");
  await until(() => closes.length === 2, "closed");
  assert.equal(closes[1].reconnect, false);
  assert.equal(sb.state, "disconnected");
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(server.conns.length, 2, "no reconnect after 4003");
});

test("backoff grows while the server is down (full jitter within bounds)", async (t) => {
  const server = await new FakeServer().start();
  const url = server.url;
  await server.stop(); // nothing listens: every attempt fails
  const delays = [];
  const sb = new Switchboard(url, { minReconnectDelay: 10, maxReconnectDelay: 80, random: () => 0.999 });
  t.after(() => sb.disconnect());
  sb.on("connecting", (i) => i.delay !== undefined && delays.push(i.delay));
  sb.connect().catch(() => {});
  await until(() => delays.length >= 6, "six attempts");
  sb.disconnect();
  // [0], then 10·2^n capped at 80 (random 0.999 → just under the cap)
  assert.deepEqual(delays.slice(1, 6), [9, 19, 39, 79, 79]);
});

test("getToken is called on every attempt; refresh_required sends a fresh token", async (t) => {
  let n = 0;
  const server = await new FakeServer((c, f) => {
    if (f.type === "refresh") return c.send({ type: "refreshed", id: f.id, exp: 2 });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, { ...FAST, getToken: async () => `jwt${++n}` });
  t.after(() => sb.disconnect());
  await sb.connect();
  assert.match(server.last.url, /token=jwt1/);
  server.last.send({ type: "refresh_required", exp: 1 });
  await until(() => server.last.frames("refresh").length === 1, "refresh");
  assert.equal(server.last.frames("refresh")[0].token, "jwt2");
  server.last.close(4001, "token expired"); // retried: a fresh token can be had
  await until(() => server.conns.length === 2 && sb.state === "connected", "reconnected");
  assert.match(server.last.url, /token=jwt3/);
});

test("a dead connection (no answer to pings) is detected within interval + timeout", async (t) => {
  let silent = false;
  const server = await new FakeServer((c, f) => {
    if (silent && c.n === 0) return; // the first connection stops answering
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, { ...FAST, pingInterval: 60, pingTimeout: 60 });
  t.after(() => sb.disconnect());
  await sb.connect();
  await until(() => server.last.frames("ping").length >= 1, "a ping when idle");
  silent = true;
  const t0 = Date.now();
  const closes = [];
  sb.on("disconnected", (i) => closes.push(i));
  await until(() => closes.length === 1, "declared dead", 2000);
  assert.ok(Date.now() - t0 <= 60 + 60 + 100, `detected after ${Date.now() - t0} ms`);
  assert.equal(closes[0].reason, "no answer to ping");
  await until(() => server.conns.length === 2 && sb.state === "connected", "reconnected");
});

test("requests in flight when the connection drops are rejected; unsent ones wait for the next connection", async (t) => {
  const server = await new FakeServer((c, f) => {
    if (f.type === "slow") return; // never answered
    if (f.type === "q") return c.send({ type: "q", id: f.id, payload: c.n });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  await sb.connect();
  const inflight = sb.request("slow");
  await until(() => server.last.frames("slow").length === 1, "sent");
  server.last.ws.terminate();
  await assert.rejects(inflight, (e) => e.code === "disconnected");
  const later = sb.request("q"); // while reconnecting
  assert.equal(await later, 1);
});

test("watch: list, item, remove; sent again after a reconnect; stop ends it", async (t) => {
  const server = await new FakeServer((c, f) => {
    if (f.type === "watch") return c.send({ type: "list", id: f.id, resource: f.resource, items: [{ id: `a${c.n}`, rack: "r1" }] });
    if (f.type === "stop") return c.send({ type: "stopped", id: f.id, resource: f.resource, params: f.params });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  const seen = [];
  const w = sb.watch("nodes", { rack: "r1" }, {
    onList: (items) => seen.push(["list", items.map((i) => i.id)]),
    onItem: (d) => seen.push(["item", d.id]),
    onRemove: (p) => seen.push(["remove", p.id]),
  });
  await sb.connect();
  await until(() => seen.length === 1, "list");
  server.last.send({ type: "item", resource: "nodes", data: { id: "b", rack: "r1" } });
  server.last.send({ type: "item", resource: "nodes", data: { id: "c", rack: "r2" } }); // another watch's
  server.last.send({ type: "item", resource: "other", data: { id: "d", rack: "r1" } });
  server.last.send({ type: "remove", resource: "nodes", params: { id: "b" } });
  await until(() => seen.length === 3, "item and remove");
  server.last.ws.terminate();
  await until(() => seen.length === 4, "list again after the reconnect");
  assert.deepEqual(seen, [["list", ["a0"]], ["item", "b"], ["remove", "b"], ["list", ["a1"]]]);
  await w.stop();
  assert.equal(server.last.frames("stop").length, 1);
  server.last.ws.terminate();
  await until(() => server.conns.length === 3 && sb.state === "connected", "third connection");
  await sb.call({ type: "ping" });
  assert.equal(server.last.frames("watch").length, 0, "a stopped watch is not sent again");
});

test("a long resume token stays off the URL (the edge reads 8 KiB of request head) but goes in init", async (t) => {
  const long = "sbr1." + "x".repeat(5000);
  const server = await new FakeServer((c, f) => {
    if (f.type === "init") return c.send({ type: "session", id: `s${c.n}`, resume: long, resumed: f.resume ? true : undefined });
    defaultAnswers(c, f);
  }).start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  await sb.connect();
  server.last.ws.terminate();
  await until(() => server.conns.length === 2 && server.last.received.length > 0, "init on the second connection");
  assert.ok(!server.last.url.includes("resume="));
  assert.equal(server.last.received[0].resume, long);
});
