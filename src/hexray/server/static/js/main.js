// The lab's entry point: builds each registered panel, runs the analysis every panel reads, and
// hands each panel its part of the stream. A panel is one module plus one line in panels/index.js.

import { Channel, Stopped, Superseded, getJSON, log } from "./api.js";
import { $ } from "./draw.js";
import { PANELS } from "./panels/index.js";
import { docs, readURL, set, state, subscribe } from "./store.js";
import { initUnits } from "./units.js";

const lab = {
  docs, state, analyses: 0, layerMessages: 0, timeline: [], requests: log, presets: [], info: null,
  channels: {},
};
window.hexrayLab = lab;  // read by the browser tests and the page benchmark

function mark(event, extra = {}) { lab.timeline.push({ t: performance.now(), event, ...extra }); }

export function status(text) { $("status").textContent = text; }

export function showError(message) {
  const el = $("error");
  el.textContent = message ? `error: ${message}` : "";
  el.hidden = !message;
  if (message) status("");
}

// Which panel's job is queued behind others, or running: the status bar and the panel's own badge.
function busy(panel, ahead) {
  const badge = document.getElementById(`${panel}-queue`) || document.querySelector(`#${panel}-panel .queue`);
  if (badge) badge.textContent = ahead === null ? "" : ahead > 0 ? `queued · ${ahead} ahead` : "running";
  if (ahead > 0) status(`${panel}: waiting for the model · ${ahead} job${ahead > 1 ? "s" : ""} ahead`);
  else if ($("status").textContent.startsWith(`${panel}: waiting`)) status(`${panel}: running…`);
  for (const button of document.querySelectorAll(`[data-stop="${panel}"]`)) button.disabled = ahead === null;
}

export function channel(name) {
  lab.channels[name] ??= new Channel(name, busy);
  return lab.channels[name];
}

// Run a job on a panel's channel; a superseded one resolves to null (its answer is dropped).
export async function job(panel, path, body, message) {
  showError("");
  try {
    return await channel(panel).request(path, body, { message });
  } catch (e) {
    if (e instanceof Superseded) return null;  // the newer request speaks for the panel
    if (e instanceof Stopped) { status(`${panel}: stopped`); return null; }
    showError(e.message);
    return null;
  }
}

// ---------------------------------------------------------------- the analysis every view reads
export function analysisRequest() {
  const body = { prompt: state.prompt, granularity: state.granularity, top_k: 20, logit_lens: true, lens_k: 5,
    residual: true, predictions_k: 5, lens_window: 48 };
  if (state.target) body.target = state.target;
  if (state.contrast) body.contrast = state.contrast;
  if (state.pos !== null) body.token_index = state.pos;
  for (const p of PANELS) Object.assign(body, p.request?.() || {});
  return body;
}

let analysisRuns = 0;

export async function analyse() {
  if (!state.prompt.trim()) { showError("the prompt is empty"); return; }
  const run = ++analysisRuns;
  const started = performance.now();
  lab.layerMessages = 0;
  lab.firstLayerMs = null;
  mark("sent");
  for (const p of PANELS) p.analysisStarted?.();
  status("analysing…");
  const live = liveDrawing(started);
  lab.streaming = true;  // panels draw the stream's partial rows until the document arrives
  const doc = await job("analysis", "/ws/analyze", analysisRequest(), (m) => {
    if (m.type === "layer") {
      lab.layerMessages += 1;
      mark("layer", { layer: m.layer });
      for (const p of PANELS) if (p.layer?.(m)) live.dirty(p);
      status(`analysing… layer ${m.layer + 1}/${m.n_layers}`);
    } else if (m.type === "attribution") {
      mark("attribution", { layer: m.layer });
      for (const p of PANELS) if (p.attribution?.(m)) live.dirty(p);
    }
  });
  live.cancel();
  if (run !== analysisRuns) return;  // superseded: the newer analysis owns the panels now
  lab.streaming = false;
  if (!doc) { renderAll(); return; }  // stopped or failed: back to the last complete view
  const t0 = performance.now();
  mark("done");
  delete doc.type;
  lab.analysis = doc;
  for (const p of PANELS) if (p.readsAnalysis) docs[`${p.id}-panel`] = doc;
  if (state.pos !== null || doc.position !== doc.tokens.length - 1) set({ pos: doc.position });
  renderAll();
  const renderMs = performance.now() - t0;
  mark("drawn");
  window.hexrayTimings = { analysisMs: t0 - started, renderMs, firstLayerMs: lab.firstLayerMs };
  lab.analyses += 1;
  const firstLayer = lab.firstLayerMs === null ? "" : ` · first layer drawn at ${(lab.firstLayerMs / 1000).toFixed(2)} s`;
  status(`${doc.tokens.length} tokens · analysed in ${((t0 - started) / 1000).toFixed(2)} s${firstLayer} · page drawn in ${renderMs.toFixed(0)} ms`);
  for (const p of PANELS) await p.analysed?.(doc);
}

export function renderAll() { for (const p of PANELS) p.render?.(); }

// Streamed messages can come faster than frames: panels record each one, and what changed is drawn
// at most every LIVE_MS (a burst of thirty rows costs one drawing; on two cores the browser's drawing
// takes CPU from the forward pass, so fewer drawings leave the model more).
const LIVE_MS = 100;

const onScreen = new Set();  // panel ids in the viewport now

function watchViewport() {
  const seen = new IntersectionObserver((entries) => {
    for (const e of entries) onScreen[e.isIntersecting ? "add" : "delete"](e.target.id.replace(/-panel$/, ""));
  });
  for (const p of PANELS) seen.observe($(`${p.id}-panel`));
}

function liveDrawing(started) {
  const dirty = new Set();
  let timer = null, last = -Infinity;
  const draw = () => {
    timer = null;
    last = performance.now();
    const shown = [...dirty].filter((p) => onScreen.has(p.id));  // a panel out of view is drawn when the document arrives
    for (const p of shown) p.drawLive();
    dirty.clear();
    if (!shown.length) return;
    mark("layer-drawn", { layers: lab.layerMessages, panels: shown.map((p) => p.id) });
    lab.firstLayerMs ??= performance.now() - started;
  };
  return {
    dirty(p) { dirty.add(p); timer ??= setTimeout(draw, Math.max(0, last + LIVE_MS - performance.now())); },
    cancel() { clearTimeout(timer); timer = null; dirty.clear(); },
  };
}

// ---------------------------------------------------------------- the page
function build() {
  const main = document.querySelector("main");
  for (const p of PANELS) {
    const section = document.createElement("section");
    section.className = `panel${p.wide ? " wide" : ""}`;
    section.id = `${p.id}-panel`;
    if (p.title) {
      section.dataset.title = p.title;
      section.innerHTML = `<h2>${p.title} <span class="dim">${p.subtitle || ""}</span><span class="queue dim"></span><span class="exports"></span></h2>${p.body}`;  // static text only
    } else {
      section.innerHTML = p.body;
    }
    main.append(section);
  }
}

function download(name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

function addExports() {
  for (const p of PANELS.filter((x) => x.title)) {
    const panel = $(`${p.id}-panel`);
    const box = panel.querySelector(".exports");
    const png = document.createElement("button");
    png.type = "button"; png.textContent = "PNG"; png.dataset.export = "png"; png.title = "save this panel as a PNG";
    png.addEventListener("click", () => {
      const fig = p.figure?.(panel);
      if (!fig) { showError("nothing to export yet in this panel"); return; }
      fig.toBlob((blob) => download(`hexray-${p.id}.png`, blob), "image/png");
    });
    const json = document.createElement("button");
    json.type = "button"; json.textContent = "JSON"; json.dataset.export = "json"; json.title = "save this panel's data as JSON";
    json.addEventListener("click", () => {
      const doc = docs[panel.id];
      if (!doc) { showError("nothing to export yet in this panel"); return; }
      download(`hexray-${p.id}.json`, new Blob([JSON.stringify(doc, null, 1)], { type: "application/json" }));
    });
    box.append(png, json);
  }
}

function applyTheme() {
  document.documentElement.dataset.theme = state.theme;
  renderAll();
}

async function init() {
  build();
  watchViewport();
  addExports();
  readURL();
  const context = { lab, analyse, channel, job, status, showError, renderAll };
  for (const p of PANELS) p.init?.(context);
  initUnits(context);  // the neuroscope's drawer: any data-unit label opens its card
  subscribe((changed) => { if (changed.includes("theme")) applyTheme(); });
  $("theme").addEventListener("click", () => set({ theme: state.theme === "dark" ? "light" : "dark" }));
  applyTheme();
  try {
    const health = await getJSON("/api/health");
    const info = health.model_info;
    lab.info = info;
    $("model-badge").textContent = `${health.model} · ${info.n_layers}L × ${info.n_heads}H · d=${info.d_model}`;
    if (info.weights) $("model-badge").title = `weights: ${info.weights}`;
    const [options, registry, presets, dictionaries] = await Promise.all(
      [getJSON("/api/options"), getJSON("/api/analyses"), getJSON("/api/presets"), getJSON("/api/dictionaries")]);
    lab.presets = presets.presets;
    for (const p of PANELS) p.configure?.({ options, registry: registry.analyses, presets: presets.presets, dictionaries: dictionaries.dictionaries, tunedLens: dictionaries.tuned_lens });
  } catch {
    $("model-badge").textContent = "server unreachable";
  }
  if (state.prompt) {  // a shared view: redo what it showed
    await analyse();
    for (const p of PANELS) if (p.restore && state.ran.includes(p.id)) await p.restore();
  }
}

init();
