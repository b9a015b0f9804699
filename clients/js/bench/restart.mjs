// One Node process, N clients of this SDK (default 1000), each subscribed to a history topic,
// through a restart of `switchboard dev --nats` (JetStream keeps the history): messages are
// published while no switchboard process runs, and the figure is the time from the new
// process being ready until every client is connected, resubscribed with `recovered: true`,
// and has every message exactly once.
//
//   node clients/js/bench/restart.mjs [N] [--no-history] [--max-delay=MS]
//
// --max-delay is the clients' maxReconnectDelay (default the client's, 20000 ms): the time
// to all recovered is mostly the full-jitter backoff the clients built up while no server
// answered (during the drain the old process refuses upgrades, 503).
//
// Needs nats-server and the binary (target/debug/switchboard, or $SWITCHBOARD_BIN).
import { writeFileSync, mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { connect as tcp } from "node:net";
import { Switchboard } from "../dist/index.mjs";
import { startDev, startNats, until } from "../../../tests/browser/harness.mjs";

const N = Number(process.argv.find((a) => /^\d+$/.test(a)) ?? 1000);
const TOPICS = 10;
const MISSED = 5;
const history = !process.argv.includes("--no-history");
const maxDelay = Number(process.argv.find((a) => a.startsWith("--max-delay="))?.split("=")[1] ?? 20000);

const config = join(mkdtempSync(join(tmpdir(), "sb-bench-")), "dev.yaml");
writeFileSync(
  config,
  `edge:
  drain_window: 2s
  routes:
    - path: /connect
      anonymous: true
      publish: true
${history ? `      history:
        - topics: "bench/#"
          size: 1000
          ttl: 5m
` : ""}`,
);

async function natsPublishMany(url, msgs) {
  const { hostname, port } = new URL(url);
  const sock = tcp({ host: hostname, port: Number(port) });
  let buf = "";
  sock.on("data", (d) => (buf += d));
  await until(() => buf.includes("INFO"), "nats INFO", 5000);
  let out = `CONNECT {"verbose":false,"pedantic":false}\r\n`;
  for (const [subject, payload] of msgs) {
    const body = Buffer.from(JSON.stringify(payload));
    out += `PUB ${subject} ${body.length}\r\n${body}\r\n`;
  }
  sock.write(out + "PING\r\n");
  await until(() => buf.includes("PONG"), "nats PONG", 5000);
  sock.destroy();
}

const nats = await startNats();
let dev = await startDev({ nats: nats.url, config });
const clients = [];
try {
  const t0 = performance.now();
  for (let i = 0; i < N; i++) {
    const sb = new Switchboard(dev.wsUrl, { params: { user: `u${i}` }, maxReconnectDelay: maxDelay });
    const c = { sb, got: [], recovered: undefined };
    c.sub = sb.subscribe(`bench/${i % TOPICS}`, { onMessage: (p) => c.got.push(p.n) });
    c.sub.on("subscribed", (ctx) => (c.recovered = ctx.recovered));
    sb.connect().catch(() => {});
    clients.push(c);
  }
  await until(() => clients.every((c) => c.sb.state === "connected" && c.sub.state === "subscribed"), "all connected", 120000);
  console.log(`maxReconnectDelay ${maxDelay} ms, history ${history}`);
  console.log(`${N} clients connected and subscribed in ${((performance.now() - t0) / 1000).toFixed(2)} s`);
  // One live message per topic, so every position is known.
  const { ws, grpc } = dev;
  await natsPublishMany(nats.url, Array.from({ length: TOPICS }, (_, t) => [history ? `sb.hist.default.bench.${t}` : `sb.topic.default.bench.${t}`, { n: 0 }]));
  await until(() => clients.every((c) => c.got.length === 1), "live message everywhere", 30000);

  const tStop = performance.now();
  await dev.stop();
  const stopped = performance.now();
  const msgs = [];
  for (let n = 1; n <= MISSED; n++) for (let t = 0; t < TOPICS; t++) msgs.push([`sb.hist.default.bench.${t}`, { n }]);
  if (history) await natsPublishMany(nats.url, msgs);
  dev = await startDev({ nats: nats.url, config, ws, grpc });
  const tReady = performance.now();
  const expected = history ? MISSED + 1 : 1;
  await until(
    () => clients.every((c) => c.sb.state === "connected" && c.sub.state === "subscribed" && c.got.length === expected),
    "all recovered",
    180000,
    50,
  );
  const tAll = performance.now();
  const dup = clients.reduce((s, c) => s + c.sub.duplicates, 0);
  const bad = clients.filter((c) => c.got.join() !== Array.from({ length: expected }, (_, i) => i).join()).length;
  const recovered = clients.filter((c) => c.recovered === true).length;
  console.log(
    `drain + exit of the old process: ${((stopped - tStop) / 1000).toFixed(2)} s; new process ready after ${((tReady - stopped) / 1000).toFixed(2)} s`,
  );
  console.log(
    `all ${N} reconnected, resubscribed${history ? ` and recovered (${MISSED} missed messages each)` : ""} ${((tAll - tReady) / 1000).toFixed(2)} s after the new process was ready (${((tAll - tStop) / 1000).toFixed(2)} s after SIGTERM)`,
  );
  console.log(`recovered:true ${recovered}/${N}; clients with a wrong sequence ${bad}; duplicates dropped by the client ${dup}`);
  if (bad > 0 || (history && recovered !== N)) process.exitCode = 1;
} finally {
  for (const c of clients) c.sb.disconnect();
  await dev.stop();
  await nats.stop();
}
