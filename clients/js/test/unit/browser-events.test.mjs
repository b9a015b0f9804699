// The browser's online/offline and visibility events, with window, document and navigator
// played by EventTargets (this file runs in its own process: the globals stay here).
import { test } from "node:test";
import assert from "node:assert/strict";
import { Switchboard } from "../../dist/index.mjs";
import { FakeServer, until, FAST } from "./fake.mjs";

globalThis.window = new EventTarget();
globalThis.document = Object.assign(new EventTarget(), { visibilityState: "visible" });
Object.defineProperty(globalThis, "navigator", { value: { onLine: true }, configurable: true, writable: true });

test("offline drops the socket and waits for online; online reconnects at once", async (t) => {
  const server = await new FakeServer().start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, FAST);
  t.after(() => sb.disconnect());
  const closes = [];
  sb.on("disconnected", (i) => closes.push(i));
  await sb.connect();
  navigator.onLine = false;
  window.dispatchEvent(new Event("offline"));
  await until(() => closes.length === 1, "dropped");
  assert.equal(closes[0].reason, "browser offline");
  assert.equal(closes[0].delay, undefined, "no timer while offline");
  await new Promise((r) => setTimeout(r, 150)); // several backoff periods: no attempt
  assert.equal(server.conns.length, 1);
  navigator.onLine = true;
  window.dispatchEvent(new Event("online"));
  await until(() => sb.state === "connected" && server.conns.length === 2, "reconnected on online");
});

test("visible again: a probe at once when connected, a reconnect at once when waiting", async (t) => {
  const server = await new FakeServer().start();
  t.after(() => server.stop());
  const sb = new Switchboard(server.url, { ...FAST, minReconnectDelay: 60000, maxReconnectDelay: 60000, random: () => 0.99 });
  t.after(() => sb.disconnect());
  await sb.connect();
  document.dispatchEvent(new Event("visibilitychange"));
  await until(() => server.last.frames("ping").length === 1, "probe on visible");
  server.last.ws.terminate();
  await until(() => sb.state === "connecting", "waiting a minute to reconnect");
  document.dispatchEvent(new Event("visibilitychange"));
  await until(() => sb.state === "connected" && server.conns.length === 2, "reconnected on visible");
});
