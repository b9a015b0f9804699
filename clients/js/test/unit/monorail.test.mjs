// The MonoRail (seed 003) client against a fake monorail-dialect edge.
import { test } from "node:test";
import assert from "node:assert/strict";
import { MonoRail } from "../../dist/index.mjs";
import { FakeServer, until, FAST } from "./fake.mjs";

const items = { n1: { id: "n1", rack: "r1" }, n2: { id: "n2", rack: "r2" } };

function monorailEdge(c, f) {
  switch (f.handler) {
    case "init":
      return c.send({ handler: "session", id: f.session ?? `sess${c.n}` });
    case "all":
      return c.send({ handler: "list", type: f.type, items: Object.values(items) });
    case "query":
      return c.send({ handler: "list", type: f.type, items: Object.values(items).filter((i) => i.rack === f.params.rack) });
    case "get":
      return items[f.params.id]
        ? c.send({ handler: "item", type: f.type, data: items[f.params.id] })
        : c.send({ handler: "remove", type: f.type, params: f.params });
    case "watch":
      return c.send({ handler: "list", type: f.type, items: [] });
  }
}

test("the seed's flow: init → session, all, query, get, watch → list/item/remove, stop, reconnect", async (t) => {
  const server = await new FakeServer(monorailEdge).start();
  t.after(() => server.stop());
  const client = new MonoRail(server.url.replace("/connect", "/rack"), FAST);
  t.after(() => client.disconnect());
  const seen = [];
  for (const h of ["open", "ready", "list", "item", "remove", "close"]) client.events.on(h, (x) => seen.push([h, x]));
  let ready = false;
  client.ready(() => (ready = true));
  let session;
  client.init((id) => (session = id));
  await until(() => session, "session");
  assert.equal(session, "sess0");
  assert.ok(ready);
  assert.equal(client.wsConn.readyState, 1);
  assert.equal(server.last.url, "/rack");

  client.all("nodes");
  client.query("nodes", { rack: "r1" });
  client.get("nodes", { id: "n2" });
  client.get("nodes", { id: "gone" });
  client.watch("nodes", { rack: "r1" });
  await until(() => seen.filter(([h]) => h === "list").length === 3, "three lists");
  await until(() => seen.filter(([h]) => h === "item" || h === "remove").length === 2, "item and remove");
  const lists = seen.filter(([h]) => h === "list").map(([, f]) => f.items.length);
  assert.deepEqual(lists, [2, 1, 0]);
  server.last.send({ handler: "item", type: "nodes", data: { id: "n3", rack: "r1" } });
  server.last.send({ handler: "remove", type: "nodes", params: { id: "n3" } });
  await until(() => seen.filter(([h]) => h === "remove").length === 2, "watch pushes");

  // once: fires a single time
  let onceCount = 0;
  client.events.once("item", () => onceCount++);

  // Reconnect: the same session is named again and the running watch is sent again.
  server.last.ws.terminate();
  await until(() => server.conns.length === 2 && server.last.frames("watch").length === 1, "watch re-sent");
  const again = server.last.received;
  assert.deepEqual(again[0], { handler: "init", session: "sess0" });
  assert.deepEqual(again[1], { handler: "watch", type: "nodes", params: { rack: "r1" } });
  assert.ok(seen.some(([h]) => h === "close"));

  client.stop("nodes", { rack: "r1" });
  await until(() => server.last.frames("stop").length === 1, "stop sent");
  server.last.send({ handler: "item", type: "nodes", data: { id: "x" } });
  server.last.send({ handler: "item", type: "nodes", data: { id: "y" } });
  await until(() => seen.filter(([h]) => h === "item").length === 4, "items");
  assert.equal(onceCount, 1);
  server.last.ws.terminate();
  await until(() => server.conns.length === 3 && server.last.frames("init").length === 1, "third connection");
  assert.equal(server.last.frames("watch").length, 0, "a stopped watch is not re-sent");
});

test("a connection error is an `error` event, then `close`, then the client retries", async (t) => {
  const server = await new FakeServer(monorailEdge).start();
  const url = server.url;
  await server.stop(); // nothing listens
  const client = new MonoRail(url, FAST);
  t.after(() => client.disconnect());
  const seen = [];
  client.events.on("error", () => seen.push("error"));
  client.events.on("close", (i) => seen.push(`close:${i.reconnect}`));
  await until(() => seen.length >= 4, "two failed attempts");
  assert.deepEqual(seen.slice(0, 4), ["error", "close:true", "error", "close:true"]);
});

test("disconnect() stops reconnecting; connect() reconnects", async (t) => {
  const server = await new FakeServer(monorailEdge).start();
  t.after(() => server.stop());
  const client = new MonoRail(server.url, { ...FAST, autoConnect: false });
  t.after(() => client.disconnect());
  assert.equal(server.conns.length, 0);
  client.connect();
  await new Promise((r) => client.ready(r));
  client.disconnect();
  await new Promise((r) => setTimeout(r, 100));
  assert.equal(server.conns.length, 1);
  client.connect();
  await until(() => server.conns.length === 2, "reconnected by hand");
});
