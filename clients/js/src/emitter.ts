/** A minimal event emitter (browsers have no `events` module; this keeps the bundle small). */
// eslint-disable-next-line @typescript-eslint/no-explicit-any
export type Listener = (...args: any[]) => void;

export class Emitter {
  private listeners = new Map<string, Listener[]>();

  /** Calls `fn` on every `event`; returns a function that removes it. */
  on(event: string, fn: Listener): () => void {
    const list = this.listeners.get(event);
    if (list) list.push(fn);
    else this.listeners.set(event, [fn]);
    return () => this.off(event, fn);
  }

  /** Calls `fn` on the next `event` only. */
  once(event: string, fn: Listener): () => void {
    const off = this.on(event, (...args) => {
      off();
      fn(...args);
    });
    return off;
  }

  off(event: string, fn: Listener): void {
    const list = this.listeners.get(event);
    if (!list) return;
    const i = list.indexOf(fn);
    if (i >= 0) list.splice(i, 1);
  }

  /** Calls the listeners of `event` in order; a throwing listener does not stop the others. */
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  emit(event: string, ...args: any[]): boolean {
    const list = this.listeners.get(event);
    if (!list || list.length === 0) return false;
    for (const fn of list.slice()) {
      try {
        fn(...args);
      } catch (e) {
        // A listener's bug must not break the connection: report it asynchronously.
        setTimeout(() => {
          throw e;
        });
      }
    }
    return true;
  }
}
