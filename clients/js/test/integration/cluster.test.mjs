// The client against the local cluster (deploy/local/cluster.sh: nats-server, two
// coordinators, three edges, haproxy in front): JWTs from getToken on every attempt, the drain
// of the edge it is on, and the move to another edge through the load balancer.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Switchboard } from "../../dist/index.mjs";
import { grpcurl, hs256, startCluster, until } from "../../../../tests/browser/harness.mjs";

test("cluster: token per attempt, the drain of the client's edge, another edge through haproxy", async (t) => {
  const cluster = await startCluster();
  t.after(() => cluster.down());
  const g = (method, body) => grpcurl(cluster.grpc, `switchboard.v1.${method}`, body, { key: cluster.key });
  let tokens = 0;
  const sb = new Switchboard(cluster.lb, {
    getToken: async () => (tokens++, hs256(cluster.secret, { sub: "dora" })),
    minReconnectDelay: 100,
    maxReconnectDelay: 1000,
    drainDelay: 3000,
    random: () => 0.9, // the drain reconnect waits 2.7 s: time to publish while away
  });
  t.after(() => sb.disconnect());
  const got = [];
  const sub = sb.subscribe("room/1", { onMessage: (p) => got.push(p) });
  const closes = [];
  sb.on("disconnected", (i) => closes.push(i));
  await sb.connect();
  await until(() => sub.state === "subscribed", "subscribed");
  assert.equal(tokens, 1);

  // Which edge holds dora: drain exactly that one.
  const where = await until(async () => {
    const r = await g("Placement/Locate", { namespace: "default", user: "dora" });
    return (r.connections ?? r.conns ?? []).length > 0 || (r.nodeIds ?? []).length > 0 ? r : null;
  }, "placement of dora");
  const node = JSON.stringify(where).match(/edge-\d/)[0];
  await g("Messaging/Publish", { namespace: "default", topic: "room/1", payload: { n: 1 } });
  await until(() => got.length === 1, "first message");
  process.kill(cluster.pid(node), "SIGTERM");
  await until(() => closes.length === 1, "drain close", 20000);
  assert.equal(closes[0].code, 1001);
  await until(() => sb.state === "connected" && sub.state === "subscribed", "on another edge", 30000);
  assert.ok(tokens >= 2, `a fresh token per attempt (${tokens})`);
  const moved = await g("Placement/Locate", { namespace: "default", user: "dora" });
  assert.ok(!JSON.stringify(moved).includes(`"${node}"`), `dora left ${node}: ${JSON.stringify(moved)}`);
  await g("Messaging/Publish", { namespace: "default", topic: "room/1", payload: { n: 2 } });
  await until(() => got.length === 2, "message on the new edge");
  assert.deepEqual(got, [{ n: 1 }, { n: 2 }]);
});

/** cluster.sh's edge config plus history on room/#. */
const HISTORY_EDGE_CONFIG = `
edge:
  routes:
    - path: /connect
      namespace: { query: namespace, default: default }
      auth:
        hs256_secret_env: SWITCHBOARD_JWT_SECRET
        user_claim: sub
        namespaces_claim: namespaces
        header: true
        query: token
        cookie: ID_TOKEN
      publish: true
      allowed_origins: ["*"]
      history:
        - topics: "room/#"
          size: 100
          ttl: 5m
`;

test("cluster with history: SIGKILL of the client's edge, resume on another edge, every message once and in order", async (t) => {
  const cluster = await startCluster({ edgeConfig: HISTORY_EDGE_CONFIG });
  t.after(() => cluster.down());
  const g = (method, body) => grpcurl(cluster.grpc, `switchboard.v1.${method}`, body, { key: cluster.key });
  const sb = new Switchboard(cluster.lb, {
    getToken: async () => hs256(cluster.secret, { sub: "erin" }),
    minReconnectDelay: 1500,
    maxReconnectDelay: 3000,
    random: () => 0.99, // the first retry waits ~1.5 s: time to publish while away
  });
  t.after(() => sb.disconnect());
  const got = [];
  const sub = sb.subscribe("room/2", { onMessage: (p) => got.push(p.n) });
  const sessions = [];
  sb.on("connected", (c) => sessions.push(c));
  const ctxs = [];
  sub.on("subscribed", (c) => ctxs.push(c));
  await sb.connect();
  await until(() => sub.state === "subscribed", "subscribed");
  let n = 0;
  const publish = () => g("Messaging/Publish", { namespace: "default", topic: "room/2", payload: { n: ++n } });
  await publish();
  await publish();
  await until(() => got.length === 2, "live messages");
  const where = await g("Placement/Locate", { namespace: "default", user: "erin" });
  const node = JSON.stringify(where).match(/edge-\d/)[0];
  const closes = [];
  sb.on("disconnected", (i) => closes.push(i));
  process.kill(cluster.pid(node), "SIGKILL");
  await until(() => closes.length === 1, "connection lost", 20000);
  for (let i = 0; i < 3; i++) await publish(); // while the client is away
  await until(() => sb.state === "connected" && sub.state === "subscribed", "back on another edge", 30000);
  for (let i = 0; i < 2; i++) await publish();
  await until(() => got.length === n, `all ${n} messages`, 15000);
  assert.deepEqual(got, Array.from({ length: n }, (_, i) => i + 1), "every message once, in order");
  assert.equal(sessions.at(-1).resumed, true, "resumed with the token on another edge");
  assert.equal(ctxs.at(-1).recovered, true);
  assert.equal(sub.duplicates, 0);
});
