export { Switchboard, SwitchboardError, type SwitchboardOptions, type Watch, type WatchHandlers } from "./switchboard.js";
export {
  Subscription,
  topicMatches,
  type MessageFrame,
  type Position,
  type SubscribeOptions,
  type SubscribedContext,
  type SubscriptionState,
} from "./subscription.js";
export { MonoRail, type MonoRailOptions } from "./monorail.js";
export {
  Connection,
  type CloseInfo,
  type ConnState,
  type ConnectionOptions,
  type WebSocketCtor,
  type WebSocketLike,
} from "./connection.js";
export { fullJitter, classifyClose, type CloseVerdict } from "./backoff.js";
export { Emitter } from "./emitter.js";
