// The page's one state object. Form fields, the explained position, the selected head, the theme
// and which jobs ran live here and in the URL (a URL is a shareable view); the documents the
// server answered live in `docs`, by panel. Panels read the store and subscribe; they never
// read another panel's DOM.

const FIELDS = {  // URL key -> state key, with its default
  prompt: ["prompt", ""], target: ["target", ""], contrast: ["contrast", ""], gran: ["granularity", "head"],
  clean: ["clean", ""], corrupt: ["corrupt", ""], sweep: ["sweep", "heads"], method: ["method", "exact"],
  abl: ["components", ""], mode: ["mode", "zero"], gen_n: ["max_new", ""], watch: ["watch", ""], chat: ["chat", false],
  pos: ["pos", null], head: ["head", null], theme: ["theme", "dark"], view: ["view", ""], ran: ["ran", []],
  preset: ["preset", ""], flow_layer: ["flow_layer", ""], ck: ["circuit_k", "5"], cd: ["circuit_depth", "2"], an: ["analyses", []],
  dict: ["dict", ""], tl: ["tuned", false], unit: ["unit", ""],
};

export const state = Object.fromEntries(Object.values(FIELDS).map(([key, value]) => [key, value]));
export const docs = {};  // panel id -> the last document it drew (its JSON export)
const listeners = new Set();

export function subscribe(fn) { listeners.add(fn); return () => listeners.delete(fn); }

// Change the state; every subscriber hears which keys changed; the URL follows.
export function set(patch) {
  const changed = Object.keys(patch).filter((k) => state[k] !== patch[k]);
  Object.assign(state, patch);
  if (changed.length) {
    writeURL();
    for (const fn of listeners) fn(changed);
  }
}

// Put state[key] into a form control; a value the control does not offer (a hand-edited URL) falls
// back to the control's own, so the state never sends what the form does not show.
export function bind(control, key) {
  control.value = state[key];
  if (control.tagName === "SELECT" && control.value !== String(state[key])) {
    control.selectedIndex = Math.max(0, [...control.options].findIndex((o) => o.defaultSelected));  // its default
    set({ [key]: control.value });
  }
}

export function ran(job) {
  if (!state.ran.includes(job)) set({ ran: [...state.ran, job] });
}

export function readURL() {
  const q = new URLSearchParams(location.search);
  for (const [urlKey, [key, fallback]] of Object.entries(FIELDS)) {
    if (!q.has(urlKey)) continue;
    const v = q.get(urlKey);
    if (key === "pos") state.pos = /^-?\d+$/.test(v) ? parseInt(v, 10) : null;
    else if (key === "chat" || key === "tuned") state[key] = v === "1";
    else if (Array.isArray(fallback)) state[key] = v.split(",").filter(Boolean);
    else if (key === "theme") state.theme = v === "light" ? "light" : "dark";
    else state[key] = typeof fallback === "string" || fallback === null ? v : state[key];
  }
}

function writeURL() {
  const q = new URLSearchParams();
  for (const [urlKey, [key, fallback]] of Object.entries(FIELDS)) {
    const v = state[key];
    if (v === fallback || v === "" || v === null || (Array.isArray(v) && !v.length)) continue;
    q.set(urlKey, Array.isArray(v) ? v.join(",") : v === true ? "1" : String(v));
  }
  history.replaceState(null, "", `${location.pathname}?${q}`);
}
