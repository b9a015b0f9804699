/**
 * Full-jitter exponential backoff: the delay before retry `attempt` (0-based) is uniform in
 * [0, min(max, base * 2^attempt)). Spreads reconnecting clients evenly instead of in waves.
 */
export function fullJitter(attempt: number, base: number, max: number, random: () => number): number {
  const cap = Math.min(max, base * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** What a close means for reconnecting. */
export type CloseVerdict = "retry" | "drain" | "pause" | "refresh" | "terminal";

/**
 * Classifies a close code and reason (docs/PROTOCOL.md §8):
 * - 1001 `server shutting down` (drain): reconnect soon, with a random delay, backoff reset;
 * - 1003, 1007, 1009 (the client sent something wrong), 1002, 1010, 4003 (token revoked) and
 *   1008 `connection refused` (the onconnect hook refused): never retried by themselves;
 * - 4001 (token expired): retried only when a fresh token can be had (`getToken`);
 * - 1008 (rate limit, too many connections) and 1013 (slow consumer): retried after a pause;
 * - anything else (1000, 1006, 1011, 1012, 1014, network errors): retried with backoff.
 */
export function classifyClose(code: number, reason: string): CloseVerdict {
  if (code === 1001) return "drain";
  if (code === 4001) return "refresh";
  if ([1002, 1003, 1007, 1009, 1010, 4003].includes(code)) return "terminal";
  if (code === 1008) return reason === "connection refused" ? "terminal" : "pause";
  if (code === 1013) return "pause";
  return "retry";
}
