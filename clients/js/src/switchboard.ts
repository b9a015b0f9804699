import { Connection, type CloseInfo, type ConnState, type ConnectionOptions } from "./connection.js";
import { Emitter } from "./emitter.js";
import {
  Subscription,
  isWildcard,
  topicMatches,
  type MessageFrame,
  type Position,
  type SubscribeOptions,
} from "./subscription.js";

export interface SwitchboardOptions extends ConnectionOptions {
  /** A fixed token (sent as `?token=`). */
  token?: string;
  /** Called before every connection attempt and on `refresh_required`: a fresh token. */
  getToken?: () => string | Promise<string>;
  /** The query parameter carrying the token (default `token`). */
  tokenParam?: string;
  /** Extra query parameters (e.g. `{ user: "alice", namespace: "acme" }`). */
  params?: Record<string, string>;
  /** Default timeout of publish/request/call in ms (default 10000). */
  timeout?: number;
  /** Use resume tokens on reconnect (default true). */
  resume?: boolean;
}

/** An error answered by the edge or a backend, or a local failure (`timeout`, `disconnected`). */
export class SwitchboardError extends Error {
  constructor(
    readonly code: string,
    message: string,
    /** A backend's `{"error": E}` answer: E. */
    readonly payload?: unknown,
    /** The whole error frame, when there was one. */
    readonly frame?: Record<string, unknown>,
  ) {
    super(message);
    this.name = "SwitchboardError";
  }
}

type Frame = Record<string, unknown>;

interface Pending {
  resolve(f: Frame): void;
  reject(e: Error): void;
  timer: ReturnType<typeof setTimeout>;
  frame: Frame;
  sent: boolean;
  /** The subscription a subscribe is for. */
  sub?: Subscription;
}

/** What a `watch` calls: the full list (again after every reconnect), then changes. */
export interface WatchHandlers {
  onList?: (items: Record<string, unknown>[]) => void;
  onItem?: (data: Record<string, unknown>) => void;
  onRemove?: (params: Record<string, unknown>) => void;
  onError?: (e: SwitchboardError) => void;
}

/** A running watch of a resource type (docs/PROTOCOL.md §4.3); `stop()` ends it. */
export interface Watch {
  readonly resource: string;
  readonly params: Record<string, unknown>;
  stop(): Promise<void>;
}

interface WatchEntry extends Watch {
  h: WatchHandlers;
}

/** The longest resume token also put on the upgrade URL (`?resume=`). */
const RESUME_IN_URL_MAX = 2048;

/** Codes after which a subscribe is not tried again by itself. */
const FINAL_SUBSCRIBE_ERRORS = ["invalid_topic", "invalid_frame", "forbidden"];

/**
 * The native-protocol client (docs/PROTOCOL.md). Events: `state` (state, detail), `connecting`
 * ({attempt, delay}), `connected` ({session, resumed}), `disconnected` ({code, reason,
 * reconnect, delay}), `error` (Error), `push` (frame: any frame no request or subscription
 * claimed).
 */
export class Switchboard extends Emitter {
  /** The session id of the current connection. */
  session: string | undefined;
  private resumeToken: string | undefined;
  private readonly conn: Connection;
  private readonly subs = new Map<string, Subscription>();
  private readonly pending = new Map<number, Pending>();
  private readonly handlers = new Map<string, Set<(payload: unknown, frame: Frame) => void>>();
  private readonly watches = new Set<WatchEntry>();
  private nextId = 1;
  private token: string | undefined;
  private awaitingSession = false;
  private restoreTimer: ReturnType<typeof setTimeout> | undefined;

  constructor(
    readonly url: string,
    private readonly options: SwitchboardOptions = {},
  ) {
    super();
    this.token = options.token;
    this.conn = new Connection(() => this.connectUrl(), options, {
      open: () => this.onOpen(),
      frame: (f) => this.onFrame(f),
      closed: (info) => this.onClosed(info),
      probe: () => ({ type: "ping" }),
      canRefresh: () => !!options.getToken,
      state: (s, detail) => {
        this.emit("state", s, detail);
        this.emit(s, detail);
      },
      error: (e) => this.emit("error", e),
    });
  }

  get state(): ConnState {
    return this.conn.state;
  }

  /** The current WebSocket, if any. */
  get ws() {
    return this.conn.ws;
  }

  /** Failed attempts since the last connection. */
  get attempt(): number {
    return this.conn.attempt;
  }

  /** Connects (and keeps reconnecting until `disconnect`). Resolves when connected. */
  connect(): Promise<void> {
    const done = this.state === "connected" ? Promise.resolve() : this.whenConnected();
    this.conn.start();
    return done;
  }

  /** Closes with 1000 and stops reconnecting; pending requests are rejected. */
  disconnect(): void {
    this.conn.stop();
  }

  /**
   * Subscribes to `topic` (an MQTT filter). The subscription resubscribes itself after every
   * reconnect, recovering what it missed on history topics. One subscription per filter.
   */
  subscribe(topic: string, options: SubscribeOptions = {}): Subscription {
    const existing = this.subs.get(topic);
    if (existing) throw new Error(`already subscribed to ${topic}: unsubscribe it first`);
    const sub = new Subscription(topic, options, (s) => this.leave(s));
    this.subs.set(topic, sub);
    if (this.state === "connected") this.sendSubscribe(sub);
    return sub;
  }

  /** The live subscription to `topic`, if any. */
  subscription(topic: string): Subscription | undefined {
    return this.subs.get(topic);
  }

  /** Publishes to a topic; resolves with the `published` answer (with `offset`, `epoch` on history topics). */
  publish(topic: string, payload: unknown, opts: { echo?: boolean; timeout?: number } = {}): Promise<Frame> {
    const frame: Frame = { type: "publish", topic, payload };
    if (opts.echo) frame.echo = true;
    return this.call(frame, opts);
  }

  /**
   * Sends an event of `type` for backends and resolves with the reply's payload (the first
   * reply; rejects with a SwitchboardError on an error answer or timeout).
   */
  async request(type: string, payload?: unknown, opts: { timeout?: number } = {}): Promise<unknown> {
    const f = await this.call({ type, payload }, opts);
    return "payload" in f ? f.payload : f;
  }

  /**
   * Sends any frame with a fresh `id` and resolves with the answer carrying it (watch, query,
   * history…). Waits for the connection (within the timeout) when not connected. A request
   * whose connection drops before the answer is rejected with `disconnected`: its outcome is
   * unknown.
   */
  call(frame: Frame, opts: { timeout?: number } = {}, sub?: Subscription): Promise<Frame> {
    const id = this.nextId++;
    const full = { ...frame, id };
    const timeout = opts.timeout ?? this.options.timeout ?? 10000;
    return new Promise<Frame>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new SwitchboardError("timeout", `no answer within ${timeout} ms`));
      }, timeout);
      const p: Pending = { resolve, reject, timer, frame: full, sent: false, sub };
      this.pending.set(id, p);
      if (this.state === "connected") p.sent = this.conn.send(full);
    });
  }

  /**
   * Watches `resource` items matching `params`: `onList` with the matching items, then
   * `onItem`/`onRemove` as they change. The watch is sent again after every reconnect (its
   * `onList` then starts over).
   */
  watch(resource: string, params: Record<string, unknown> = {}, h: WatchHandlers = {}): Watch {
    const w: WatchEntry = {
      resource,
      params,
      h,
      stop: async () => {
        if (!this.watches.delete(w)) return;
        if (this.state === "connected") await this.call({ type: "stop", resource, params });
      },
    };
    this.watches.add(w);
    if (this.state === "connected") this.sendWatch(w);
    return w;
  }

  /** Calls `fn(payload, frame)` for every pushed frame of `type` (sends, broadcasts, watches). */
  handle(type: string, fn: (payload: unknown, frame: Frame) => void): () => void {
    let set = this.handlers.get(type);
    if (!set) this.handlers.set(type, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /** Sends a fresh token from `getToken` (done by itself on `refresh_required`). */
  async refresh(): Promise<void> {
    if (!this.options.getToken) throw new SwitchboardError("no_token_source", "refresh needs options.getToken");
    this.token = await this.options.getToken();
    await this.call({ type: "refresh", token: this.token });
  }

  private whenConnected(): Promise<void> {
    return new Promise((resolve, reject) => {
      const offs = [
        this.once("connected", () => {
          offs.forEach((o) => o());
          resolve();
        }),
        this.on("disconnected", (info: CloseInfo) => {
          if (info.reconnect) return;
          offs.forEach((o) => o());
          reject(new SwitchboardError("disconnected", `closed ${info.code} ${info.reason}`));
        }),
      ];
    });
  }

  private async connectUrl(): Promise<string> {
    if (this.options.getToken) this.token = await this.options.getToken();
    const u = new URL(this.url, typeof location !== "undefined" ? location.href : undefined);
    if (u.protocol === "http:") u.protocol = "ws:";
    if (u.protocol === "https:") u.protocol = "wss:";
    for (const [k, v] of Object.entries(this.options.params ?? {})) u.searchParams.set(k, v);
    if (this.token) u.searchParams.set(this.options.tokenParam ?? "token", this.token);
    // On the URL only while short (it grows with the subscriptions and the edge reads at most
    // 8 KiB of request head): there it only spares the onconnect hook; `init` always carries it.
    if (this.resumeToken && this.options.resume !== false && this.resumeToken.length <= RESUME_IN_URL_MAX)
      u.searchParams.set("resume", this.resumeToken);
    return u.toString();
  }

  private onOpen(): void {
    const init: Frame = { type: "init" };
    if (this.resumeToken && this.options.resume !== false) {
      init.resume = this.resumeToken;
      const positions: Record<string, Position> = {};
      for (const s of this.subs.values()) {
        const p = s.position();
        s._since = p;
        if (p) positions[s.topic] = p;
      }
      init.positions = positions;
    }
    this.awaitingSession = true;
    this.conn.send(init);
  }

  private onFrame(f: Frame): void {
    const type = f.type;
    if (typeof f.resume === "string" && (type === "session" || type === "subscribed" || type === "unsubscribed"))
      this.resumeToken = f.resume;
    if (type === "session" && this.awaitingSession) return this.onSession(f);
    if (type === "message") return this.onMessage(f as unknown as MessageFrame);
    if (type === "pong" && f.id === undefined) return;
    const id = typeof f.id === "number" ? f.id : undefined;
    const p = id !== undefined ? this.pending.get(id) : undefined;
    if (type === "subscribed") return this.onSubscribed(f, p);
    if (type === "unsubscribed") {
      if (p) this.settle(id!, p, f);
      return;
    }
    if (p) return this.settle(id!, p, f);
    if (type === "gap") {
      for (const s of this.subs.values()) if (topicMatches(s.topic, String(f.topic))) s._gap(f);
      return;
    }
    if (type === "refresh_required") {
      if (this.options.getToken)
        this.refresh().catch((e) => this.emit("error", e instanceof Error ? e : new Error(String(e))));
      else this.emit("error", new SwitchboardError("refresh_required", "token expires soon and no getToken is set"));
      return;
    }
    if (typeof f.resource === "string" && ["item", "remove", "list", "error"].includes(String(type))) this.onWatchFrame(f);
    if (type === "error") this.emit("error", new SwitchboardError(String(f.code ?? "error"), String(f.message ?? ""), f.payload, f));
    const hs = typeof type === "string" ? this.handlers.get(type) : undefined;
    if (hs) for (const h of [...hs]) h(f.payload, f);
    this.emit("push", f);
  }

  private onSession(f: Frame): void {
    this.awaitingSession = false;
    this.session = typeof f.id === "string" ? f.id : undefined;
    const resumed = f.resumed === true;
    for (const s of this.subs.values()) {
      if (!resumed) s._inToken = false;
      s._setState("subscribing");
    }
    this.conn.established({ session: this.session, resumed });
    if (resumed) {
      // The server restores what the token holds, each with its `subscribed` frame. Anything
      // the token could not hold (a subscribe unanswered when the connection dropped) is sent
      // now; a restoration that never comes is retried after the timeout.
      for (const s of this.subs.values()) if (!s._inToken) this.sendSubscribe(s);
      if (this.restoreTimer) clearTimeout(this.restoreTimer);
      this.restoreTimer = setTimeout(() => {
        for (const s of this.subs.values()) if (s.state === "subscribing" && !s._pending) this.sendSubscribe(s);
      }, this.options.timeout ?? 10000);
    } else {
      for (const s of this.subs.values()) this.sendSubscribe(s);
    }
    for (const p of this.pending.values()) if (!p.sent && !this.isSubscribe(p)) p.sent = this.conn.send(p.frame);
    for (const w of this.watches) this.sendWatch(w);
  }

  private onSubscribed(f: Frame, p: Pending | undefined): void {
    const id = typeof f.id === "number" ? f.id : undefined;
    if (p && id !== undefined) {
      clearTimeout(p.timer);
      this.pending.delete(id);
    }
    const topic = String(f.topic);
    const s = this.subs.get(topic);
    // A restoration or a late answer for a filter no longer wanted: drop it on the server too.
    if (!s) {
      this.conn.send({ type: "unsubscribe", topic });
      return;
    }
    // A late answer to an earlier subscription's subscribe (unsubscribed since) is not this one's.
    if (p && p.sub !== s) return;
    s._subscribed(f, !p);
  }

  private onMessage(f: MessageFrame): void {
    for (const s of this.subs.values()) if (topicMatches(s.topic, f.topic)) s._message(f);
  }

  private settle(id: number, p: Pending, f: Frame): void {
    clearTimeout(p.timer);
    this.pending.delete(id);
    if (f.type === "error") {
      const code = typeof f.code === "string" ? f.code : "backend_error";
      const message = typeof f.message === "string" ? f.message : "the backend answered an error";
      p.reject(new SwitchboardError(code, message, f.payload, f));
    } else p.resolve(f);
  }

  private sendWatch(w: WatchEntry): void {
    this.call({ type: "watch", resource: w.resource, params: w.params }).then(
      (f) => this.watches.has(w) && w.h.onList?.((f.items as Record<string, unknown>[]) ?? []),
      (e: SwitchboardError) => e.code !== "disconnected" && this.watches.has(w) && w.h.onError?.(e),
    );
  }

  /** A pushed `item`/`remove`/`list`/`error` of a running watch: to every watch it may concern. */
  private onWatchFrame(f: Frame): void {
    for (const w of this.watches) {
      if (w.resource !== f.resource) continue;
      const data = f.data as Record<string, unknown> | undefined;
      if (f.type === "item" && data && Object.entries(w.params).every(([k, v]) => data[k] === v)) w.h.onItem?.(data);
      else if (f.type === "remove") w.h.onRemove?.((f.params as Record<string, unknown>) ?? {});
      else if (f.type === "list" && JSON.stringify(f.params ?? w.params) === JSON.stringify(w.params))
        w.h.onList?.((f.items as Record<string, unknown>[]) ?? []);
      else if (f.type === "error") w.h.onError?.(new SwitchboardError(String(f.code), String(f.message), f.payload, f));
    }
  }

  private sendSubscribe(s: Subscription): void {
    const frame: Frame = { type: "subscribe", topic: s.topic };
    const since = s.position();
    if (since && !isWildcard(s.topic)) frame.since = since;
    s._since = frame.since as Position | undefined;
    s._pending = true;
    this.call(frame, {}, s).then(
      () => {},
      (e: SwitchboardError) => {
        s._pending = false;
        if (this.subs.get(s.topic) !== s || e.code === "disconnected") return;
        s.emit("error", e);
        if (FINAL_SUBSCRIBE_ERRORS.includes(e.code)) return s.unsubscribe();
        // `unavailable`, `timeout`: try again, later.
        setTimeout(
          () => {
            if (this.subs.get(s.topic) === s && this.state === "connected" && s.state === "subscribing") this.sendSubscribe(s);
          },
          500 + Math.floor((this.options.random ?? Math.random)() * 2000),
        );
      },
    );
  }

  private isSubscribe(p: Pending): boolean {
    return p.frame.type === "subscribe";
  }

  private leave(s: Subscription): void {
    if (this.subs.get(s.topic) !== s) return;
    this.subs.delete(s.topic);
    // Ordered after any subscribe on the same socket: the edge ends up without the filter.
    if (this.state === "connected") this.call({ type: "unsubscribe", topic: s.topic }).catch(() => {});
  }

  private onClosed(info: CloseInfo): void {
    this.awaitingSession = false;
    if (this.restoreTimer) clearTimeout(this.restoreTimer);
    for (const s of this.subs.values()) if (s.state === "subscribed") s._setState("subscribing");
    for (const [id, p] of this.pending) {
      // Subscribes are re-sent by the next session; requests not yet sent wait for it (within
      // their timeout) unless the client gives up; requests sent are in doubt.
      if (this.isSubscribe(p) || (info.reconnect && !p.sent)) {
        if (this.isSubscribe(p)) {
          clearTimeout(p.timer);
          this.pending.delete(id);
          if (p.sub) p.sub._pending = false;
        }
        continue;
      }
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(new SwitchboardError("disconnected", `connection closed (${info.code}) before the answer`));
    }
    if (!info.reconnect) for (const s of this.subs.values()) s._setState("subscribing");
  }
}
