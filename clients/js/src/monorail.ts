import { Connection, type ConnectionOptions, type WebSocketLike } from "./connection.js";
import { Emitter } from "./emitter.js";

type Frame = Record<string, unknown>;

export interface MonoRailOptions extends ConnectionOptions {
  /** Connect in the constructor (default true, as the seed's client does). */
  autoConnect?: boolean;
}

/**
 * The MonoRail (RackHD, seed 003) client over the same reconnecting core: `handler`-keyed
 * frames on a `monorail` dialect route (`ws://host:port/<channel>`).
 *
 * `events` emits `open`, `close` ({code, reason, reconnect, delay}), `error` (a connection
 * error, or an `error` frame), `message` (every frame), `ready`, `init` (session id, frame)
 * and one event per incoming frame's `handler` (`session`, `list`, `item`, `remove`, …).
 *
 * After a reconnect it names the same session again (when `init` was called) and re-sends
 * every running `watch`, so the server answers each with a fresh `list`.
 */
export class MonoRail {
  /** EventEmitter-style: `on(event, fn)`, `once(event, fn)`, `off`, `emit`. */
  readonly events = new Emitter();
  /** The session id the last `init` got. */
  session: string | undefined;
  private readonly conn: Connection;
  private readonly watches = new Map<string, Frame>();
  private initWanted = false;
  private probing = false;

  constructor(
    readonly url: string,
    options: MonoRailOptions = {},
  ) {
    this.conn = new Connection(async () => url, options, {
      open: () => this.onOpen(),
      frame: (f) => this.onFrame(f),
      closed: (info) => this.events.emit("close", info),
      // The dialect has no ping verb: naming the same session again is answered at once and
      // changes nothing. Before any `init` there is no probe.
      probe: () => {
        if (!this.session) return null;
        this.probing = true;
        return { handler: "init", session: this.session };
      },
      canRefresh: () => false,
      state: () => {},
      error: (e) => this.events.emit("error", e),
      socketError: (ev) => this.events.emit("error", ev),
    });
    if (options.autoConnect !== false) this.connect();
  }

  /** The current WebSocket instance (`onopen`, `onclose`, `onerror`, `onmessage`, `send`). */
  get wsConn(): WebSocketLike | undefined {
    return this.conn.ws;
  }

  /** Connects (or reconnects now); the client keeps reconnecting until `disconnect`. */
  connect(): this {
    this.conn.start();
    return this;
  }

  disconnect(): this {
    this.conn.stop();
    return this;
  }

  /** Calls `callback()` once the connection is open (now, if it is). */
  ready(callback: () => void): this {
    if (this.conn.state === "connected") callback();
    else this.events.once("ready", callback);
    return this;
  }

  /** Sends `init`; `callback(sessionId, frame)` on the `session` answer. */
  init(callback?: (session: string, frame: Frame) => void): this {
    this.initWanted = true;
    if (callback) this.events.once("init", callback);
    this.ready(() => this.send({ handler: "init" }));
    return this;
  }

  all(type: string): this {
    return this.send({ handler: "all", type });
  }

  query(type: string, params: Frame = {}): this {
    return this.send({ handler: "query", type, params });
  }

  get(type: string, params: Frame = {}): this {
    return this.send({ handler: "get", type, params });
  }

  /** Watches `type` items matching `params` (`list`, then `item`/`remove`), across reconnects. */
  watch(type: string, params: Frame = {}): this {
    const f = { handler: "watch", type, params };
    this.watches.set(key(type, params), f);
    return this.send(f);
  }

  /** Stops the watch with the same type and params (with empty params: every watch of the type). */
  stop(type: string, params: Frame = {}): this {
    const empty = Object.keys(params).length === 0;
    for (const [k, w] of this.watches) if (w.type === type && (empty || k === key(type, params))) this.watches.delete(k);
    return this.send({ handler: "stop", type, params });
  }

  /** Sends a frame now if open; frames sent while disconnected are dropped (watches are kept). */
  private send(f: Frame): this {
    this.conn.send(f);
    return this;
  }

  private onOpen(): void {
    // The MonoRail dialect has no handshake: open is ready.
    this.conn.established();
    this.events.emit("open");
    if (this.initWanted) this.send(this.session ? { handler: "init", session: this.session } : { handler: "init" });
    for (const w of this.watches.values()) this.send(w);
    this.events.emit("ready");
  }

  private onFrame(f: Frame): void {
    const handler = typeof f.handler === "string" ? f.handler : undefined;
    if (handler === "session") {
      if (this.probing && f.id === this.session) {
        this.probing = false;
        return;
      }
      this.session = typeof f.id === "string" ? f.id : this.session;
      this.events.emit("message", f);
      this.events.emit("session", f);
      this.events.emit("init", this.session, f);
      return;
    }
    this.events.emit("message", f);
    if (handler) this.events.emit(handler, f);
  }
}

function key(type: string, params: Frame): string {
  return type + "\u0000" + JSON.stringify(Object.entries(params).sort(([a], [b]) => (a < b ? -1 : 1)));
}
