// The neuroscope in the lab: a unit's card (GET /api/units/NAME) in a side drawer, and the reverse
// look-ups (GET /api/units?prompt=&position= and ?token=). Any element carrying data-unit="L9H6",
// anywhere on the page, opens that unit's card: one delegated click handler, so a panel only marks
// its labels (unitName says which labels name a unit the neuroscope indexes).
import { errorText } from "./api.js";
import { $, css, mix, showTok, sizeCanvas, tip } from "./draw.js";
import { set, state } from "./store.js";

// neurons L10N1234, heads L9H6, features L1F12 or NAME:123; not MLP10, ATTN3, embed (a position suffix @5 is dropped)
const UNIT = /^(?:L\d+[NHF]\d+|[A-Za-z][^\s:@]*:\d+)$/;

export function unitName(label) {
  const name = String(label ?? "").trim().split("@")[0];
  return UNIT.test(name) ? name : null;
}

// A label as text, clickable (data-unit) when it names a unit.
export function unitLabel(text, name = text) {
  const span = document.createElement("span");
  span.textContent = text;
  const unit = unitName(name);
  if (unit) { span.dataset.unit = unit; span.title = `${unit}: open its neuroscope card`; }
  return span;
}

const DRAWER = `
  <div class="drawer-head">
    <strong>Neuroscope</strong>
    <form id="unit-search" class="row">
      <input id="unit-token" size="12" placeholder="' Paris'" spellcheck="false" title="a vocabulary token (one token; mind the leading space)">
      <button id="unit-token-run" type="submit" title="units whose top examples centre on this token">units on token</button>
    </form>
    <span class="spacer"></span>
    <button id="unit-close" type="button" title="close (Esc)">✕</button>
  </div>
  <div id="unit-hits" class="unit-hits"></div>
  <div id="unit-card" class="unit-card"></div>`;

let lab = null;
let cardAsked = 0, hitsAsked = 0;  // the newest request of each kind wins; older answers are dropped

export function initUnits(context) {
  lab = context.lab;
  const drawer = document.createElement("aside");
  drawer.id = "unit-drawer";
  drawer.className = "drawer";
  drawer.hidden = true;
  drawer.setAttribute("role", "dialog");
  drawer.setAttribute("aria-label", "neuroscope");
  drawer.innerHTML = DRAWER;  // static text only
  document.body.append(drawer);
  $("unit-close").addEventListener("click", closeDrawer);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape" && !drawer.hidden) closeDrawer(); });
  document.addEventListener("click", (e) => {
    const el = e.target.closest && e.target.closest("[data-unit]");
    if (el && !e.shiftKey) { e.preventDefault(); openUnit(el.dataset.unit); }
  });
  $("unit-search").addEventListener("submit", (e) => { e.preventDefault(); unitsOnToken($("unit-token").value); });
  const open = $("neuroscope-open");
  if (open) open.addEventListener("click", () => { showDrawer(); $("unit-token").focus(); });
  if (state.unit) openUnit(state.unit);  // a shared view with a card open
}

function showDrawer() { $("unit-drawer").hidden = false; }

export function closeDrawer() {
  $("unit-drawer").hidden = true;
  cardAsked += 1; hitsAsked += 1;  // answers still on their way are not shown
  set({ unit: "" });
}

async function fetchDoc(url) {
  const r = await fetch(url);
  const body = await r.json().catch(() => null);
  if (!r.ok) throw new Error(errorText(body));  // e.g. no index yet: "no neuroscope index at … (build one with hexray index build)"
  return body;
}

// ---------------------------------------------------------------- a unit's card
export async function openUnit(name) {
  const asked = ++cardAsked;
  showDrawer();
  set({ unit: name });
  const card = $("unit-card");
  card.dataset.state = "loading";
  card.replaceChildren(line(`${name} loading…`, "dim"));
  try {
    const doc = await fetchDoc(`/api/units/${encodeURIComponent(name)}`);
    if (asked !== cardAsked) return;
    lab.docs["unit-card"] = doc;
    drawCard(card, doc);
    card.dataset.state = "shown";
  } catch (e) {
    if (asked !== cardAsked) return;
    delete lab.docs["unit-card"];
    card.replaceChildren(line(`${name}: ${e.message}`, "error"));  // one line: no index (and how to build one), or no such unit
    card.dataset.state = "error";
  }
}

function line(text, cls) {
  const el = document.createElement("div");
  if (cls) el.className = cls;
  el.textContent = text;
  return el;
}

function heading(text) { const h = document.createElement("h3"); h.textContent = text; return h; }

function num(v, digits = 3) { return v === null || v === undefined ? "—" : v.toFixed(digits); }

function drawCard(card, doc) {
  const head = document.createElement("div");
  head.className = "card-title";
  const name = document.createElement("span");
  name.className = "unit-name";
  name.textContent = doc.name;
  head.append(name, line(`${doc.unit.kind}${doc.unit.dictionary ? ` of ${doc.unit.dictionary}` : ""} · ${doc.index.model} · ${doc.index.tokens.toLocaleString()} tokens of ${doc.index.corpus}`, "dim"));
  const parts = [head];
  if (doc.label) {  // an automatic explanation, when the index has one
    const label = line("", "unit-label");
    const text = document.createElement("strong");
    text.textContent = doc.label.text;
    label.append("label: ", text, ` (score ${num(doc.label.score, 2)}${doc.label.source ? `, ${doc.label.source}` : ""})`);
    parts.push(label);
  }
  const stats = document.createElement("table");
  stats.className = "roles unit-stats";
  const h = stats.insertRow(), v = stats.insertRow();
  for (const [k, x] of [["max", num(doc.max)], ["mean", num(doc.mean, 4)], ["fires on", `${(100 * doc.density).toFixed(2)}%`], ["fired / counted", `${doc.fired.toLocaleString()} / ${doc.counted.toLocaleString()}`]]) {
    const th = document.createElement("th"); th.textContent = k; h.append(th);
    v.insertCell().textContent = x;
  }
  parts.push(stats);
  if (doc.promoted.length || doc.suppressed.length) {
    parts.push(heading("logit effects (per unit of activation)"), effects("promotes", doc.promoted, "pos"), effects("suppresses", doc.suppressed, "neg"));
  }
  parts.push(heading(`top ${doc.top.length} examples · shaded by activation, the example's token underlined`), examples(doc.top, doc.max, "examples"));
  if (doc.samples.length) parts.push(heading("samples across the activation range"), examples(doc.samples, doc.max, "samples"));
  const canvas = document.createElement("canvas");
  canvas.id = "unit-hist";
  canvas.className = "figure";
  parts.push(heading(`histogram of positive activations · ${doc.sampled.toLocaleString()} sampled positions, ${doc.nonpositive.toLocaleString()} at or below 0`), canvas);
  card.replaceChildren(...parts);
  drawHistogram(canvas, doc.histogram);
}

function effects(title, list, cls) {
  const row = line("", "effects");
  row.append(`${title} `);
  for (const x of list) {
    const t = document.createElement("span");
    t.className = `tok ${cls}`;
    t.textContent = `${showTok(x.token)} ${x.value >= 0 ? "+" : ""}${x.value.toFixed(2)}`;
    row.append(t);
  }
  return row;
}

function examples(list, max, cls) {
  const ol = document.createElement("ol");
  ol.className = cls;
  for (const e of list) {
    const li = document.createElement("li");
    const act = document.createElement("span");
    act.className = "act";
    act.textContent = e.band ? `${num(e.activation)} (${num(e.band[0], 2)}–${e.band[1] === null ? "∞" : num(e.band[1], 2)})` : num(e.activation);
    const ctx = document.createElement("span");
    ctx.className = "ctx";
    e.tokens.forEach((t, i) => {
      const a = e.acts[i];
      const s = document.createElement("span");
      s.textContent = t.replace(/\n/g, "↵").replace(/\t/g, "⇥");
      s.title = a === null ? "not counted" : a.toFixed(3);
      if (a === null) s.className = "off";
      else if (a > 0 && max > 0) s.style.background = mix(css("--cell"), css("--accent"), 0.8 * Math.min(1, a / max));
      if (e.window_start + i === e.position) s.classList.add("here");
      ctx.append(s);
    });
    li.append(act, ctx);
    if (e.document) li.append(line(e.document, "dim doc"));
    ol.append(li);
  }
  return ol;
}

function drawHistogram(canvas, bins) {
  const height = 90, bottom = 14;
  const bar = bins.length ? Math.min(560 / bins.length, 40) : 0;  // a few bins stay bars, not one block
  const width = Math.max(bar * bins.length, 240);
  const ctx = sizeCanvas(canvas, width, height);
  ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, width, height);
  if (!bins.length) { ctx.fillStyle = css("--dim"); ctx.fillText("no positive activations in the sample", 4, height / 2); return; }
  const peak = Math.max(...bins.map((b) => b.count));
  ctx.fillStyle = css("--accent");
  bins.forEach((b, i) => { const h = (height - bottom - 4) * b.count / peak; ctx.fillRect(i * bar, height - bottom - h, Math.max(bar - 1, 0.5), h); });
  ctx.fillStyle = css("--dim");
  ctx.fillText(num(bins[0].lower, 2), 2, height - 6);
  ctx.textAlign = "right";
  ctx.fillText(`${num(bins[bins.length - 1].lower, 2)}+`, width - 2, height - 6);
  const range = (b) => `${num(b.lower)} to ${b.upper === null ? "∞" : num(b.upper)}: ${b.count.toLocaleString()} positions`;
  canvas.onmousemove = (e) => {
    const i = Math.floor((e.clientX - canvas.getBoundingClientRect().left) / bar);
    tip(e, bins[i] ? range(bins[i]) : "");
  };
  canvas.onmouseleave = (e) => tip(e, "");
}

// ---------------------------------------------------------------- reverse look-ups
// The units firing most at the prompt's token `index` (of `tokens`, the analysis's): asked by its
// distance from the end, which stays the same when the index's contexts start with a BOS the lab's do not.
export function unitsAtToken(prompt, tokens, index) {
  const q = new URLSearchParams({ prompt, position: String(index - tokens.length), limit: "20" });
  return showHits(`/api/units?${q}`, `units firing at ${showTok(tokens[index])} (position ${index}), by activation / their max`);
}

export function unitsOnToken(token) {
  if (!token) return null;
  const q = new URLSearchParams({ token, limit: "20" });
  return showHits(`/api/units?${q}`, `units whose top examples centre on ${showTok(token)}`);
}

async function showHits(url, title) {
  const asked = ++hitsAsked;
  showDrawer();
  const box = $("unit-hits");
  box.dataset.state = "loading";
  box.replaceChildren(line(`${title}: looking…`, "dim"));
  try {
    const doc = await fetchDoc(url);
    if (asked !== hitsAsked) return;
    lab.docs["unit-hits"] = doc;
    const ol = document.createElement("ol");
    ol.className = "hits";
    for (const h of doc.hits) {
      const li = document.createElement("li");
      li.dataset.unit = h.name;
      li.textContent = `${h.name.padEnd(10)} score ${num(h.score)}  act ${num(h.activation)}  max ${num(h.max)}`;
      ol.append(li);
    }
    box.replaceChildren(line(title, "hits-title"), doc.hits.length ? ol : line("no unit found", "dim"));
    box.dataset.state = "shown";
  } catch (e) {
    if (asked !== hitsAsked) return;
    box.replaceChildren(line(`${title}: ${e.message}`, "error"));
    box.dataset.state = "error";
  }
}
