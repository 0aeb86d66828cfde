// Talking to the server. Every job runs over a WebSocket so it can be stopped; a panel's newer
// request closes its older one (the server stops that job at its next block) and drops its answers.

export function errorText(body) {
  if (!body) return "the server did not answer";
  return body.hint ? `${body.error} (${body.hint})` : (body.error || String(body));
}

export async function getJSON(path) {
  const r = await fetch(path);
  const doc = await r.json().catch(() => null);
  if (!r.ok) throw new Error(errorText(doc));
  return doc;
}

export class Stopped extends Error {
  constructor() { super("stopped"); this.stopped = true; }
}

export class Superseded extends Stopped {}  // a newer request of the same panel took its place

export const log = [];  // every request the page made: {panel, id, path, sent, ended, outcome} (read by the tests)

// One socket, one request: handlers.message(m) for each streamed message, handlers.queued(ahead)
// while the model is busy with earlier jobs; resolves with the final document.
function open(path, body, handlers) {
  let socket, finish;
  const done = new Promise((resolve, reject) => {
    finish = reject;
    socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`);
    socket.onopen = () => socket.send(JSON.stringify(body));
    socket.onmessage = (event) => {
      const m = JSON.parse(event.data);
      if (m.type === "error") { reject(new Error(errorText(m))); socket.close(); }
      else if (m.type === "done") { resolve(m); socket.close(); }
      else if (m.type === "queued") handlers.queued?.(m.ahead);
      else if (m.type === "running") handlers.queued?.(0);
      else handlers.message?.(m);
    };
    socket.onerror = () => reject(new Error("the connection to the server failed"));
    socket.onclose = (e) => reject(e.code === 1000 || e.code === 1005 ? new Stopped() : new Error(e.reason || `the connection closed (${e.code})`));
  });
  return { done, stop: () => { finish(new Stopped()); socket.close(); } };
}

// A panel's requests: one at a time, the newest wins. request() stops the one before it; its
// messages and its answer never reach the panel (each carries the id it was sent with).
export class Channel {
  constructor(panel, onBusy) {
    this.panel = panel;
    this.id = 0;
    this.current = null;
    this.onBusy = onBusy || (() => {});
  }

  get busy() { return this.current !== null; }

  stop() {
    if (this.current) { this.current.stop(); }
  }

  async request(path, body, handlers = {}) {
    this.stop();  // superseded: the server stops it at its next block
    const id = ++this.id;
    const entry = { panel: this.panel, id, path, sent: performance.now(), ended: null, outcome: "running" };
    log.push(entry);
    const live = () => id === this.id;
    const job = open(path, body, {
      message: (m) => live() && handlers.message?.(m),
      queued: (ahead) => live() && this.onBusy(this.panel, ahead),
    });
    this.current = job;
    this.onBusy(this.panel, 0);
    try {
      const doc = await job.done;
      entry.outcome = live() ? "landed" : "dropped";
      if (!live()) throw new Superseded();
      return doc;
    } catch (e) {
      if (entry.outcome === "running") entry.outcome = e.stopped ? (live() ? "stopped" : "superseded") : "error";
      if (!live()) throw new Superseded();  // an answer to a superseded request is never shown
      throw e;
    } finally {
      entry.ended = performance.now();
      if (live()) { this.current = null; this.onBusy(this.panel, null); }
    }
  }
}
