import { Emitter } from "./emitter.js";

/** A position in a topic's history: resume from after `offset` in `epoch`. */
export interface Position {
  offset: number;
  epoch: string;
}

export type SubscriptionState = "subscribing" | "subscribed" | "unsubscribed";

/** A pushed topic publication, as the edge sends it. */
export interface MessageFrame {
  type: "message";
  topic: string;
  payload: unknown;
  offset?: number;
  message_id?: string;
}

export interface SubscribeOptions {
  /** Called once per message (never twice for the same offset, across reconnects). */
  onMessage?: (payload: unknown, message: MessageFrame) => void;
  /** Recover from here on the first subscribe (a position kept from an earlier session). */
  since?: Position;
}

/** What a `subscribed` event tells. */
export interface SubscribedContext {
  /** Whether missed messages follow (true), could not be recovered (false), or none were asked (undefined). */
  recovered?: boolean;
  /** Whether this subscribe asked for recovery (a `since` was sent). */
  recovering: boolean;
  /** Whether the server restored this subscription from a resume token. */
  resumed: boolean;
  epoch?: string;
  offset?: number;
}

/** Whether MQTT filter `filter` matches the concrete topic `topic`. */
export function topicMatches(filter: string, topic: string): boolean {
  if (filter === topic) return true;
  const f = filter.split("/");
  const t = topic.split("/");
  for (let i = 0; i < f.length; i++) {
    if (f[i] === "#") return true;
    if (i >= t.length) return false;
    if (f[i] !== "+" && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

export function isWildcard(filter: string): boolean {
  return filter.split("/").some((l) => l === "+" || l === "#");
}

/**
 * One topic subscription with its own state machine: `subscribing` → `subscribed` →
 * (`subscribing` again while reconnecting) → `unsubscribed` (final). Events: `state`
 * (new, old), `subscribed` (SubscribedContext), `gap` ({epoch, offset}), `error` (Error).
 */
export class Subscription extends Emitter {
  state: SubscriptionState = "subscribing";
  /** The last `subscribed` answer's `recovered`. */
  recovered: boolean | undefined;
  /** Messages dropped because their offset had already been delivered. */
  duplicates = 0;
  /** The history epoch of the topic (from `subscribed` or `gap`). */
  epoch: string | undefined;
  /** Per concrete topic: the last delivered offset. */
  private delivered = new Map<string, number>();
  /** The offset below which nothing is missing (the `subscribed` offset when live-only). */
  private floor: number | undefined;
  /** @internal: the server holds this subscription in our latest resume token. */
  _inToken = false;
  /** @internal: the `since` sent with the pending subscribe (or the resume's positions). */
  _since: Position | undefined;
  /** @internal: a subscribe of ours awaits its answer. */
  _pending = false;

  constructor(
    readonly topic: string,
    private readonly options: SubscribeOptions,
    private readonly leave: (s: Subscription) => void,
  ) {
    super();
    if (options.since && !isWildcard(topic)) {
      this.epoch = options.since.epoch;
      this.floor = options.since.offset;
    }
  }

  /**
   * Where to recover from after a reconnect: the larger of the last delivered offset and the
   * `subscribed` offset (when that answer promised no replay), in the subscribed epoch. While a
   * replay is still arriving the `subscribed` offset is not counted, so a connection lost
   * mid-replay recovers the rest. Undefined for wildcard filters and topics without history.
   */
  position(): Position | undefined {
    if (this.epoch === undefined || isWildcard(this.topic)) return undefined;
    const d = this.delivered.get(this.topic);
    const offset = Math.max(d ?? -1, this.floor ?? -1);
    return offset < 0 ? undefined : { offset, epoch: this.epoch };
  }

  /** Stops the subscription (final). */
  unsubscribe(): void {
    if (this.state === "unsubscribed") return;
    this.setState("unsubscribed");
    this.leave(this);
  }

  /** @internal */
  _setState(s: SubscriptionState): void {
    this.setState(s);
  }

  /** @internal: a `subscribed` answer (or restoration) for this topic. */
  _subscribed(f: Record<string, unknown>, resumed: boolean): void {
    if (this.state === "unsubscribed") return;
    const epoch = typeof f.epoch === "string" ? f.epoch : undefined;
    const offset = typeof f.offset === "number" ? f.offset : undefined;
    const recovered = typeof f.recovered === "boolean" ? f.recovered : undefined;
    const recovering = this._since !== undefined;
    if (epoch !== undefined) {
      if (this.epoch !== undefined && this.epoch !== epoch) {
        // A new epoch: old offsets mean nothing in it.
        this.delivered.clear();
        this.floor = undefined;
      }
      this.epoch = epoch;
      // Replay follows up to `offset` when recovered; else live from `offset` on.
      if (recovered === true) this.floor = Math.max(this.floor ?? -1, this._since?.offset ?? -1);
      else if (offset !== undefined) this.floor = Math.max(this.floor ?? -1, offset);
    }
    this.recovered = recovered;
    this._since = undefined;
    this._pending = false;
    this._inToken = true;
    this.setState("subscribed");
    const ctx: SubscribedContext = { recovered, recovering, resumed, epoch, offset };
    this.emit("subscribed", ctx);
  }

  /** @internal: a message on a topic this filter matches. */
  _message(f: MessageFrame): void {
    if (this.state === "unsubscribed") return;
    if (typeof f.offset === "number") {
      const last = this.delivered.get(f.topic);
      if (last !== undefined && f.offset <= last) {
        this.duplicates++;
        return;
      }
      this.delivered.set(f.topic, f.offset);
    }
    this.options.onMessage?.(f.payload, f);
    this.emit("message", f.payload, f);
  }

  /** @internal: the edge could not repair a gap; messages before `offset` may be missing. */
  _gap(f: Record<string, unknown>): void {
    const topic = String(f.topic);
    const epoch = typeof f.epoch === "string" ? f.epoch : undefined;
    const offset = typeof f.offset === "number" ? f.offset : undefined;
    if (epoch !== undefined && epoch !== this.epoch) {
      this.delivered.delete(topic);
      if (!isWildcard(this.topic)) this.floor = undefined;
      this.epoch = epoch;
    }
    if (offset !== undefined) {
      const d = this.delivered.get(topic);
      if (d === undefined || d < offset - 1) this.delivered.set(topic, offset - 1);
    }
    this.emit("gap", { topic, epoch, offset });
  }

  private setState(s: SubscriptionState): void {
    const old = this.state;
    if (old === s) return;
    this.state = s;
    this.emit("state", s, old);
    if (s === "unsubscribed") this.emit("unsubscribed");
  }
}
