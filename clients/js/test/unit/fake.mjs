// A scripted fake edge for unit tests: a real WebSocket server (`ws`) on 127.0.0.1:0 whose
// answers the test decides. `until` polls a condition with a bound (no bare sleeps).
import { WebSocketServer } from "ws";

export class FakeServer {
  /** @param {(conn: FakeConn, frame: any) => void} onFrame */
  constructor(onFrame = defaultAnswers) {
    this.onFrame = onFrame;
    this.conns = [];
    this.wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
    this.wss.on("connection", (ws, req) => {
      const c = new FakeConn(ws, req.url, this.conns.length);
      this.conns.push(c);
      ws.on("message", (data) => {
        const f = JSON.parse(String(data));
        c.received.push(f);
        this.onFrame(c, f);
      });
    });
  }
  async start() {
    await new Promise((r) => this.wss.once("listening", r));
    this.url = `ws://127.0.0.1:${this.wss.address().port}/connect`;
    return this;
  }
  get last() {
    return this.conns[this.conns.length - 1];
  }
  async stop() {
    for (const c of this.conns) c.ws.terminate();
    await new Promise((r) => this.wss.close(r));
  }
}

export class FakeConn {
  constructor(ws, url, n) {
    this.ws = ws;
    this.url = url;
    this.n = n;
    this.received = [];
  }
  send(f) {
    if (this.ws.readyState === 1) this.ws.send(JSON.stringify(f));
  }
  close(code, reason) {
    this.ws.close(code, reason);
  }
  frames(type) {
    return this.received.filter((f) => f.type === type || f.handler === type);
  }
}

/** Answers like a native edge without history: session, subscribed, published, pong. */
export function defaultAnswers(c, f) {
  switch (f.type) {
    case "init":
      return c.send({ type: "session", id: `s${c.n}`, resume: `tok${c.n}` });
    case "subscribe":
      return c.send({ type: "subscribed", id: f.id, topic: f.topic, resume: `tok${c.n}-${f.id}` });
    case "unsubscribe":
      return c.send({ type: "unsubscribed", id: f.id, topic: f.topic, resume: `tok${c.n}-u${f.id}` });
    case "publish":
      return c.send({ type: "published", id: f.id, topic: f.topic });
    case "ping":
      return c.send({ type: "pong", id: f.id });
  }
}

export async function until(cond, what = "condition", ms = 3000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = cond();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** Fast, deterministic reconnect settings for tests. */
export const FAST = { minReconnectDelay: 20, maxReconnectDelay: 100, drainDelay: 20, random: () => 0.5 };
