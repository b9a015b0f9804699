/**
 * The reconnecting socket both clients share: URL (and token) per attempt, full-jitter backoff,
 * close-code policy, the drain hint, dead-connection detection and, in browsers, the
 * online/offline and visibility events. It knows nothing of frames beyond JSON: the protocol
 * layer (native or MonoRail) reacts to `hooks` and calls `established()` when its handshake
 * is done.
 */
import { classifyClose, fullJitter } from "./backoff.js";

/** The WebSocket surface used: the browser's, Node's global one (22+) and `ws` all have it. */
export interface WebSocketLike {
  readonly readyState: number;
  onopen: ((ev: unknown) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketCtor = new (url: string) => WebSocketLike;

export interface ConnectionOptions {
  /** The WebSocket class; default the global `WebSocket`, else the `ws` package (Node < 22). */
  WebSocket?: WebSocketCtor;
  /** Whether to reconnect after an unexpected close (default true). */
  reconnect?: boolean;
  /** Backoff base in ms: retry n waits uniform [0, min(max, base·2ⁿ)) (default 500). */
  minReconnectDelay?: number;
  /** Backoff cap in ms (default 20000). */
  maxReconnectDelay?: number;
  /** After a drain close (1001) the reconnect waits uniform [0, drainDelay) ms (default 1000). */
  drainDelay?: number;
  /** An attempt that is not established within this many ms is abandoned (default 10000). */
  connectTimeout?: number;
  /**
   * When nothing arrives for this many ms a probe is sent (default 25000, the edge's heartbeat
   * interval; 0 disables). Browsers cannot see WebSocket pings, so liveness is judged from
   * frames only.
   */
  pingInterval?: number;
  /** The connection is declared dead when nothing arrives this many ms after a probe (default 10000). */
  pingTimeout?: number;
  /** Source of randomness for the jitter (tests make it deterministic). */
  random?: () => number;
}

export type ConnState = "disconnected" | "connecting" | "connected";

export interface CloseInfo {
  code: number;
  reason: string;
  /** Whether a reconnect is scheduled. */
  reconnect: boolean;
  /** The delay before it, in ms. */
  delay?: number;
}

export interface ConnectionHooks {
  /** The socket opened: send the handshake. */
  open(): void;
  /** A parsed frame arrived. */
  frame(f: Record<string, unknown>): void;
  /** The socket is gone (`established` or not). */
  closed(info: CloseInfo): void;
  /** A liveness probe frame, or null when none can be sent now. */
  probe(): Record<string, unknown> | null;
  /** Whether a fresh token can be had (4001 is then worth retrying). */
  canRefresh(): boolean;
  /** Emits a state change or an error to the user. */
  state(s: ConnState, detail?: unknown): void;
  error(e: Error): void;
  /** The WebSocket's own `error` event (a close event follows). */
  socketError?(ev: unknown): void;
}

const OPEN = 1;

export class Connection {
  state: ConnState = "disconnected";
  ws: WebSocketLike | undefined;
  /** Failed attempts since the last established connection. */
  attempt = 0;
  private wanted = false;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private liveness: ReturnType<typeof setTimeout> | undefined;
  private lastRx = 0;
  private probeAt = 0;
  private waitingOnline = false;
  private unlisten: (() => void) | undefined;
  private readonly o: Required<Omit<ConnectionOptions, "WebSocket">> & { WebSocket?: WebSocketCtor };

  constructor(
    private readonly url: () => Promise<string>,
    options: ConnectionOptions,
    private readonly hooks: ConnectionHooks,
  ) {
    this.o = {
      reconnect: true,
      minReconnectDelay: 500,
      maxReconnectDelay: 20000,
      drainDelay: 1000,
      connectTimeout: 10000,
      pingInterval: 25000,
      pingTimeout: 10000,
      random: Math.random,
      ...options,
    };
  }

  /** Starts connecting (no-op when already connecting or connected). */
  start(): void {
    if (this.wanted && this.state !== "disconnected") return;
    this.wanted = true;
    this.listen();
    this.attempt = 0;
    this.clearTimer();
    this.state = "connecting";
    this.hooks.state("connecting", { attempt: 0, delay: 0 });
    void this.open();
  }

  /** Closes for good (1000) and stops reconnecting. */
  stop(code = 1000, reason = "client disconnect"): void {
    this.wanted = false;
    this.clearTimer();
    this.unlisten?.();
    this.unlisten = undefined;
    const ws = this.ws;
    if (ws) {
      this.detach(ws);
      try {
        ws.close(code, reason);
      } catch {
        /* already closed */
      }
    }
    this.closed(code, reason, false);
  }

  /** Sends a frame when the socket is open; false otherwise. */
  send(frame: unknown): boolean {
    const ws = this.ws;
    if (!ws || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  /** The protocol handshake is done: the connection counts as up. */
  established(detail?: unknown): void {
    this.clearTimer();
    this.attempt = 0;
    this.state = "connected";
    this.hooks.state("connected", detail);
  }

  /** Abandons the current socket (e.g. a protocol error or a dead peer) and reconnects. */
  drop(reason: string, code = 4000): void {
    const ws = this.ws;
    if (!ws) return;
    this.detach(ws);
    try {
      ws.close(code, reason);
    } catch {
      /* already closed */
    }
    this.after(1006, reason);
  }

  /** Sends a liveness probe now (e.g. the page became visible after a sleep). */
  probeNow(): void {
    if (this.state !== "connected") return;
    const p = this.hooks.probe();
    if (!p || !this.send(p)) return;
    this.probeAt = Date.now();
    this.armLiveness(this.o.pingTimeout);
  }

  private async open(): Promise<void> {
    this.clearTimer();
    this.state = "connecting";
    let url: string;
    let Ctor: WebSocketCtor;
    try {
      url = await this.url();
      Ctor = this.o.WebSocket ?? (await defaultWebSocket());
    } catch (e) {
      this.hooks.error(e instanceof Error ? e : new Error(String(e)));
      if (this.wanted) this.after(1006, "no url or token");
      return;
    }
    if (!this.wanted) return;
    let ws: WebSocketLike;
    try {
      ws = new Ctor(url);
    } catch (e) {
      this.hooks.error(e instanceof Error ? e : new Error(String(e)));
      this.after(1006, "websocket constructor failed");
      return;
    }
    this.ws = ws;
    this.timer = setTimeout(() => this.drop("connect timeout"), this.o.connectTimeout);
    ws.onopen = () => {
      this.rx();
      this.hooks.open();
    };
    ws.onmessage = (ev) => {
      this.rx();
      if (typeof ev.data !== "string") return;
      let f: unknown;
      try {
        f = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (f && typeof f === "object" && !Array.isArray(f)) this.hooks.frame(f as Record<string, unknown>);
    };
    // The close event follows and says what to do.
    ws.onerror = (ev) => this.hooks.socketError?.(ev);
    ws.onclose = (ev) => {
      this.detach(ws);
      this.after(ev.code ?? 1006, ev.reason ?? "");
    };
  }

  /** The socket closed: decide whether and when to reconnect. */
  private after(code: number, reason: string): void {
    this.ws = undefined;
    this.clearTimer();
    if (!this.wanted || !this.o.reconnect) {
      this.wanted = false;
      return this.closed(code, reason, false);
    }
    const verdict = classifyClose(code, reason);
    if (verdict === "terminal" || (verdict === "refresh" && !this.hooks.canRefresh())) {
      this.wanted = false;
      this.unlisten?.();
      return this.closed(code, reason, false);
    }
    if (typeof navigator !== "undefined" && navigator.onLine === false) {
      // Offline: wait for the `online` event rather than burn attempts.
      this.waitingOnline = true;
      return this.closed(code, reason, true);
    }
    const { minReconnectDelay: base, maxReconnectDelay: max, random } = this.o;
    let delay: number;
    if (verdict === "drain") {
      // The edge spreads its drain closes over its drain window and another edge (behind the
      // same address) takes us: come back soon, jittered, and do not count it as a failure.
      this.attempt = 0;
      delay = Math.floor(random() * this.o.drainDelay);
    } else {
      delay = fullJitter(this.attempt++, base, max, random);
      // Told to slow down: at least half the cap.
      if (verdict === "pause") delay = Math.max(delay, max / 2 + Math.floor((random() * max) / 2));
    }
    this.closed(code, reason, true, delay);
    this.timer = setTimeout(() => void this.open(), delay);
  }

  private closed(code: number, reason: string, reconnect: boolean, delay?: number): void {
    this.clearLiveness();
    const was = this.state;
    this.state = reconnect ? "connecting" : "disconnected";
    const info: CloseInfo = { code, reason, reconnect, delay };
    this.hooks.closed(info);
    // One `disconnected` per lost connection (or the final stop), not one per failed attempt.
    if (was === "connected" || (!reconnect && was !== "disconnected")) this.hooks.state("disconnected", info);
    if (reconnect) this.hooks.state("connecting", { attempt: this.attempt, delay });
  }

  private detach(ws: WebSocketLike): void {
    ws.onopen = ws.onmessage = ws.onclose = null;
    ws.onerror = () => {};
    if (this.ws === ws) this.ws = undefined;
  }

  /** Something arrived: the peer is alive. */
  private rx(): void {
    this.lastRx = Date.now();
    if (!this.liveness && this.o.pingInterval > 0) this.armLiveness(this.o.pingInterval);
  }

  private armLiveness(ms: number): void {
    if (this.liveness) clearTimeout(this.liveness);
    this.liveness = setTimeout(() => this.checkLiveness(), ms);
  }

  /** One timer per connection, not one per frame: it looks at when the last frame came. */
  private checkLiveness(): void {
    this.liveness = undefined;
    if (!this.ws) return;
    const now = Date.now();
    if (this.probeAt > 0) {
      if (this.lastRx >= this.probeAt) {
        this.probeAt = 0;
      } else if (now - this.probeAt >= this.o.pingTimeout) {
        this.probeAt = 0;
        return this.drop("no answer to ping");
      } else {
        return this.armLiveness(this.probeAt + this.o.pingTimeout - now);
      }
    }
    const idle = now - this.lastRx;
    if (idle < this.o.pingInterval) return this.armLiveness(this.o.pingInterval - idle);
    const p = this.hooks.probe();
    if (p && this.send(p)) {
      this.probeAt = now;
      return this.armLiveness(this.o.pingTimeout);
    }
    this.armLiveness(this.o.pingInterval);
  }

  private clearLiveness(): void {
    if (this.liveness) clearTimeout(this.liveness);
    this.liveness = undefined;
    this.probeAt = 0;
  }

  private clearTimer(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = undefined;
  }

  /** Browsers: go offline at once, come back when online or visible, probe when visible. */
  private listen(): void {
    if (this.unlisten || typeof window === "undefined" || !window.addEventListener) return;
    const now = () => {
      this.waitingOnline = false;
      if (this.wanted && !this.ws) {
        this.attempt = 0;
        void this.open();
      }
    };
    const offline = () => {
      if (this.ws) this.drop("browser offline");
    };
    const online = () => {
      if (this.waitingOnline || (this.wanted && !this.ws)) now();
    };
    const visible = () => {
      if (typeof document === "undefined" || document.visibilityState !== "visible") return;
      if (this.wanted && !this.ws) now();
      else this.probeNow();
    };
    window.addEventListener("offline", offline);
    window.addEventListener("online", online);
    document?.addEventListener?.("visibilitychange", visible);
    this.unlisten = () => {
      window.removeEventListener("offline", offline);
      window.removeEventListener("online", online);
      document?.removeEventListener?.("visibilitychange", visible);
    };
  }
}

/** The global WebSocket (browsers, Node 22+), else the optional `ws` package. */
async function defaultWebSocket(): Promise<WebSocketCtor> {
  const g = (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
  if (g) return g;
  try {
    const m = (await import("ws")) as unknown as { default?: WebSocketCtor; WebSocket?: WebSocketCtor };
    const ws = m.WebSocket ?? m.default;
    if (ws) return ws;
  } catch {
    /* fall through */
  }
  throw new Error("no WebSocket: use Node 22+, install the `ws` package, or pass options.WebSocket");
}
