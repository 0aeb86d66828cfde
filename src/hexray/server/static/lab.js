// HexRay lab: one page over the HexRay API. Everything the server sends is data: text goes in with
// textContent or onto a canvas, never through innerHTML (tokens can contain "<script>").
// Panels draw what the server computed; the page only lays numbers out.

const $ = (id) => document.getElementById(id);
const PRESETS = {
  ioi: {
    prompt: "When Mary and John went to the store, John gave a drink to", target: " Mary", contrast: " John",
    clean: "When Mary and John went to the store, John gave a drink to",
    corrupt: "When Mary and John went to the store, Mary gave a drink to", components: "L23H3, L29H1, L20H0",
  },
  induction: {
    prompt: "The lamp glowed. Kexi Morb plays the drum. The lamp glowed. Kexi Morb plays the", target: "", contrast: "",
    clean: "The lamp glowed. Kexi Morb plays the drum. The lamp glowed. Kexi Morb plays the",
    corrupt: "The lamp glowed. Kexi Morb plays the harp. The lamp glowed. Kexi Morb plays the", components: "",
  },
  factual: {
    prompt: "The capital of France is", target: " Paris", contrast: " Rome",
    clean: "The capital of France is", corrupt: "The capital of Italy is", components: "",
  },
  greater: {
    prompt: "The war lasted from the year 1732 to the year 17", target: "", contrast: "",
    clean: "The war lasted from the year 1732 to the year 17", corrupt: "The war lasted from the year 1701 to the year 17", components: "",
  },
  arithmetic: {
    prompt: "12 + 7 =", target: "", contrast: "", clean: "12 + 7 =", corrupt: "12 + 5 =", components: "",
  },
};

// ---------------------------------------------------------------- page state, kept in the URL
const FIELDS = { prompt: "prompt", target: "target", contrast: "contrast", gran: "granularity", clean: "clean", corrupt: "corrupt",
  sweep: "sweep", method: "method", abl: "components", mode: "mode", gen_n: "max-new", watch: "watch" };
const state = { pos: null, head: null, theme: "dark", ran: new Set(), view: "" };
const docs = {};  // the last document each panel drew (its JSON export)
window.hexrayLab = { docs, state, analyses: 0, layerMessages: 0 };  // read by the browser tests

function readURL() {
  const q = new URLSearchParams(location.search);
  for (const [key, id] of Object.entries(FIELDS)) if (q.has(key)) $(id).value = q.get(key);
  $("chat").checked = q.get("chat") === "1";
  state.pos = q.has("pos") ? parseInt(q.get("pos"), 10) : null;
  state.head = q.get("head") || null;
  state.theme = q.get("theme") === "light" ? "light" : "dark";
  state.view = q.get("view") || "";
  state.ran = new Set((q.get("ran") || "").split(",").filter(Boolean));
  applyTheme();
}

function writeURL() {
  const q = new URLSearchParams();
  for (const [key, id] of Object.entries(FIELDS)) if ($(id).value) q.set(key, $(id).value);
  if ($("chat").checked) q.set("chat", "1");
  if (state.pos !== null) q.set("pos", String(state.pos));
  if (state.head) q.set("head", state.head);
  if (state.theme !== "dark") q.set("theme", state.theme);
  if (state.view) q.set("view", state.view);
  if (state.ran.size) q.set("ran", [...state.ran].join(","));
  history.replaceState(null, "", `${location.pathname}?${q}`);
}

function applyTheme() {
  document.documentElement.dataset.theme = state.theme;
  redrawAll();
}

// ---------------------------------------------------------------- talking to the server
function status(text) { $("status").textContent = text; }

function showError(message) {
  const el = $("error");
  el.textContent = message ? `error: ${message}` : "";
  el.hidden = !message;
  if (message) status("");
}

function errorText(body) {
  if (!body) return "the server did not answer";
  return body.hint ? `${body.error} (${body.hint})` : (body.error || String(body));
}

async function post(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const doc = await r.json().catch(() => null);
  if (!r.ok) throw new Error(errorText(doc));
  return doc;
}

// Send one request over a WebSocket; onMessage gets each message; resolves with the final "done".
function stream(path, body, onMessage) {
  let socket;
  const done = new Promise((resolve, reject) => {
    socket = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}${path}`);
    socket.onopen = () => socket.send(JSON.stringify(body));
    socket.onmessage = (event) => {
      const m = JSON.parse(event.data);
      if (m.type === "error") { reject(new Error(errorText(m))); socket.close(); }
      else if (m.type === "done") { resolve(m); socket.close(); }
      else onMessage(m);
    };
    socket.onerror = () => reject(new Error("the connection to the server failed"));
    socket.onclose = () => reject(new Error("stopped"));
  });
  return { done, close: () => socket && socket.close() };
}

// ---------------------------------------------------------------- drawing helpers
function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

function rgb(hex) {
  const h = hex.replace("#", "");
  return [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16));
}

function mix(a, b, t) {
  const [x, y] = [rgb(a), rgb(b)];
  return `rgb(${x.map((v, i) => Math.round(v + (y[i] - v) * Math.max(0, Math.min(1, t)))).join(",")})`;
}

function diverging(v, scale) {
  if (v === null || v === undefined || Number.isNaN(v)) return css("--bg");
  return mix(css("--cell"), v >= 0 ? css("--pos") : css("--neg"), Math.sqrt(Math.abs(v) / (scale || 1)));
}

function sequential(p) { return p === null || p === undefined ? css("--bg") : mix(css("--cell"), css("--accent"), p); }

function maxAbs(values) {
  let m = 0;
  for (const v of values) if (v !== null && Number.isFinite(v)) m = Math.max(m, Math.abs(v));
  return m || 1;
}

function fmt(v, digits = 3) { return v === null || v === undefined ? "—" : (v >= 0 ? "+" : "") + v.toFixed(digits); }

function showTok(t) { return JSON.stringify(t).slice(1, -1); }  // visible spaces and newlines: " Mary", "\n"

function sizeCanvas(canvas, w, h) {
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.ceil(w * dpr);
  canvas.height = Math.ceil(h * dpr);
  canvas.style.width = `${w}px`;
  canvas.style.height = `${h}px`;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.font = "11px ui-monospace, 'DejaVu Sans Mono', monospace";
  ctx.textBaseline = "middle";
  return ctx;
}

function clip(text, n) { return text.length > n ? `${text.slice(0, n - 1)}…` : text; }

// A grid of cells with row and column labels; returns nothing, but sets canvas.hit(x, y) -> {r, c} | null.
function drawGrid(canvas, g) {
  const probe = canvas.getContext("2d");
  probe.font = "11px ui-monospace, 'DejaVu Sans Mono', monospace";
  const left = Math.max(...g.rowLabels.map((l) => probe.measureText(l).width), 10) + 8;
  const colText = g.colLabels.map((l) => clip(l, 12));
  const top = g.rotate ? Math.max(...colText.map((l) => probe.measureText(l).width), 10) * 0.75 + 14 : 18;
  const extraW = g.extraW || 0;
  const gapAt = g.gapBefore ?? -1;
  const gap = gapAt >= 0 ? 8 : 0;
  const w = left + g.cols * g.cw + gap + extraW + 4;
  const h = top + g.rows * g.ch + 4;
  const ctx = sizeCanvas(canvas, w, h);
  ctx.fillStyle = css("--panel");
  ctx.fillRect(0, 0, w, h);
  const x0 = (c) => left + c * g.cw + (gapAt >= 0 && c >= gapAt ? gap : 0);
  ctx.fillStyle = css("--dim");
  ctx.textAlign = "right";
  const rowStep = Math.max(1, Math.ceil(12 / g.ch));
  g.rowLabels.forEach((l, r) => { if (r % rowStep === 0) ctx.fillText(l, left - 4, top + r * g.ch + g.ch / 2); });
  const colStep = Math.max(1, Math.ceil((g.rotate ? 11 : 24) / g.cw));
  colText.forEach((l, c) => {
    if (c % colStep) return;
    ctx.save();
    if (g.rotate) {
      ctx.translate(x0(c) + g.cw / 2, top - 4);
      ctx.rotate(-Math.PI / 4);
      ctx.textAlign = "left";
      ctx.fillText(l, 0, 0);
    } else {
      ctx.textAlign = "center";
      ctx.fillText(l, x0(c) + g.cw / 2, top - 9);
    }
    ctx.restore();
  });
  ctx.textAlign = "center";
  for (let r = 0; r < g.rows; r++) {
    for (let c = 0; c < g.cols; c++) {
      const x = x0(c), y = top + r * g.ch;
      ctx.fillStyle = g.color(r, c);
      ctx.fillRect(x, y, g.cw - (g.cw > 4 ? 1 : 0), g.ch - (g.ch > 4 ? 1 : 0));
      if (g.text && g.cw >= 30 && g.ch >= 12) {
        const t = g.text(r, c);
        if (t) { ctx.fillStyle = css("--fg"); ctx.fillText(clip(t, Math.floor(g.cw / 7)), x + g.cw / 2, y + g.ch / 2); }
      }
    }
  }
  if (g.mark) {
    ctx.strokeStyle = css("--sel");
    ctx.lineWidth = 2;
    for (const { r, c } of g.mark) if (r !== null && c !== null) ctx.strokeRect(x0(c) + 1, top + r * g.ch + 1, g.cw - 2, g.ch - 2);
    if (g.markCol !== undefined && g.markCol !== null) ctx.strokeRect(x0(g.markCol), top, g.cw, g.rows * g.ch);
  }
  if (g.extra) g.extra(ctx, left + g.cols * g.cw + gap + 4, top, g.ch);
  canvas.cellCenter = (r, c) => [x0(c) + g.cw / 2, top + r * g.ch + g.ch / 2];  // CSS pixels (tests click here)
  canvas.hit = (x, y) => {
    const r = Math.floor((y - top) / g.ch);
    let c = Math.floor((x - left) / g.cw);
    if (gapAt >= 0 && c >= gapAt) c = Math.floor((x - left - gap) / g.cw);
    return r >= 0 && r < g.rows && c >= 0 && c < g.cols ? { r, c } : null;
  };
}

function emptyCanvas(canvas, text) {
  const ctx = sizeCanvas(canvas, 360, 40);
  ctx.fillStyle = css("--dim");
  ctx.fillText(text, 4, 20);
  canvas.hit = () => null;
}

// Line chart: series [{label, values, color, axis: "left" | "right"}] over x labels.
function drawLines(canvas, xLabels, series, { width = 560, height = 240, rightMax = 1 } = {}) {
  const ctx = sizeCanvas(canvas, width, height);
  const [l, r, t, b] = [56, 40, 22, 34];
  ctx.fillStyle = css("--panel");
  ctx.fillRect(0, 0, width, height);
  const leftMax = maxAbs(series.filter((s) => s.axis !== "right").flatMap((s) => s.values));
  const X = (i) => l + (i / Math.max(1, xLabels.length - 1)) * (width - l - r);
  const Y = (v, axis) => t + (1 - v / (axis === "right" ? rightMax : leftMax)) * (height - t - b);
  ctx.strokeStyle = css("--line");
  ctx.fillStyle = css("--dim");
  ctx.textAlign = "right";
  for (let k = 0; k <= 4; k++) {
    const y = t + (k / 4) * (height - t - b);
    ctx.beginPath(); ctx.moveTo(l, y); ctx.lineTo(width - r, y); ctx.stroke();
    const tick = leftMax * (1 - k / 4);
    ctx.fillText(tick >= 100 ? tick.toFixed(0) : tick.toPrecision(3), l - 4, y);
    ctx.textAlign = "left"; ctx.fillText((rightMax * (1 - k / 4)).toFixed(2), width - r + 4, y); ctx.textAlign = "right";
  }
  ctx.textAlign = "center";
  const step = Math.max(1, Math.ceil(xLabels.length / 12));
  xLabels.forEach((lab, i) => { if (i % step === 0) ctx.fillText(lab, X(i), height - b + 12); });
  series.forEach((s, k) => {
    ctx.strokeStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
    let started = false;
    s.values.forEach((v, i) => {
      if (v === null) return;
      const xi = X(i + (s.offset || 0)), yi = Y(v, s.axis);
      if (started) ctx.lineTo(xi, yi); else { ctx.moveTo(xi, yi); started = true; }
    });
    ctx.stroke();
    ctx.fillStyle = s.color; ctx.textAlign = "left";
    ctx.fillText(`— ${s.label}`, l + 6 + k * 130, 10);
  });
}

// Paired horizontal bars: rows [{label, before, after}] of probabilities.
function drawPairedBars(canvas, rows, { width = 560 } = {}) {
  const rowH = 22, left = 130, top = 20;
  const height = top + rows.length * rowH + 6;
  const ctx = sizeCanvas(canvas, width, height);
  ctx.fillStyle = css("--panel");
  ctx.fillRect(0, 0, width, height);
  const scale = (width - left - 120) / Math.max(1e-9, ...rows.flatMap((r) => [r.before ?? 0, r.after ?? 0]));
  ctx.fillStyle = css("--dim"); ctx.textAlign = "left";
  ctx.fillText("■ before", left, 8); ctx.fillStyle = css("--pos"); ctx.fillText("■ after", left + 90, 8);
  rows.forEach((row, i) => {
    const y = top + i * rowH;
    ctx.fillStyle = css("--fg"); ctx.textAlign = "right";
    ctx.fillText(clip(showTok(row.label), 16), left - 6, y + rowH / 2);
    ctx.fillStyle = css("--dim");
    ctx.fillRect(left, y + 2, (row.before ?? 0) * scale, 8);
    ctx.fillStyle = css("--pos");
    ctx.fillRect(left, y + 11, (row.after ?? 0) * scale, 8);
    ctx.fillStyle = css("--fg"); ctx.textAlign = "left";
    ctx.fillText(`${(row.before ?? 0).toFixed(3)} → ${(row.after ?? 0).toFixed(3)}`, left + Math.max(row.before ?? 0, row.after ?? 0) * scale + 6, y + rowH / 2);
  });
}

// ---------------------------------------------------------------- tooltip
function tip(event, text) {
  const el = $("tip");
  if (!text) { el.hidden = true; return; }
  el.textContent = text;
  el.hidden = false;
  const x = Math.min(event.clientX + 14, window.innerWidth - el.offsetWidth - 8);
  const y = Math.min(event.clientY + 14, window.innerHeight - el.offsetHeight - 8);
  el.style.left = `${x}px`;
  el.style.top = `${y}px`;
}

function hover(canvas, describe, onClick) {
  const at = (e) => {
    const box = canvas.getBoundingClientRect();
    return canvas.hit ? canvas.hit(e.clientX - box.left, e.clientY - box.top) : null;
  };
  canvas.addEventListener("mousemove", (e) => { const h = at(e); tip(e, h ? describe(h) : ""); canvas.style.cursor = h && onClick ? "pointer" : "default"; });
  canvas.addEventListener("mouseleave", (e) => tip(e, ""));
  if (onClick) canvas.addEventListener("click", (e) => { const h = at(e); if (h) onClick(h, e); });
}

// ---------------------------------------------------------------- analysis: tokens, DLA, lens, residual
let analysis = null;      // the last /ws/analyze document
let partialHeads = [];    // per-layer head rows as they stream in

function analyzeRequest() {
  const body = { prompt: $("prompt").value, granularity: $("granularity").value, top_k: 20, logit_lens: true, lens_k: 5,
    residual: true, predictions_k: 5, lens_window: LENS_WINDOW };
  if ($("target").value) body.target = $("target").value;
  if ($("contrast").value) body.contrast = $("contrast").value;
  if (state.pos !== null) body.token_index = state.pos;
  for (const box of document.querySelectorAll("#analyses-options input[type=checkbox]")) if (box.checked) body[box.dataset.field] = true;
  return body;
}

// ---------------------------------------------------------------- the registry's other analyses: one generic panel
async function loadRegistry() {
  const { analyses } = await (await fetch("/api/analyses")).json();
  const box = $("analyses-options");
  box.replaceChildren();
  for (const a of analyses.filter((x) => x.lab_panel === "analyses-panel" && x.switch)) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "checkbox";
    input.dataset.field = a.switch;
    input.dataset.name = a.name;
    label.append(input, ` ${a.title}`);
    box.append(label);
  }
  if (!box.children.length) box.textContent = "every registered analysis has its own panel";
}

function renderViews() {
  const out = $("analyses-views");
  out.replaceChildren();
  for (const [name, view] of Object.entries((analysis && analysis.views) || {})) {
    const h = document.createElement("h3");
    h.textContent = view.title;
    const table = document.createElement("table");
    table.className = "roles";
    table.dataset.analysis = name;
    const head = table.insertRow();
    for (const c of view.columns) { const th = document.createElement("th"); th.textContent = c; head.append(th); }
    for (const row of view.rows) {
      const tr = table.insertRow();
      for (const v of row) tr.insertCell().textContent = typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v);
    }
    out.append(h, table);
    if (view.note) { const p = document.createElement("p"); p.className = "dim"; p.textContent = view.note; out.append(p); }
  }
}

async function runAnalysis() {
  if (!$("prompt").value.trim()) { showError("the prompt is empty"); return; }
  showError("");
  writeURL();
  $("run").disabled = true;
  partialHeads = [];
  const started = performance.now();
  status("analysing…");
  try {
    window.hexrayLab.layerMessages = 0;
    const doc = await stream("/ws/analyze", analyzeRequest(), (m) => {
      partialHeads[m.layer] = m;
      window.hexrayLab.layerMessages += 1;
      status(`analysing… layer ${m.layer + 1}/${m.n_layers}`);
      if (m.layer % 5 === 4 || m.layer === m.n_layers - 1) drawPartialDLA(m.n_layers);
    }).done;
    const t0 = performance.now();
    analysis = doc;
    docs["tokens-panel"] = docs["dla-panel"] = docs["lens-panel"] = docs["resid-panel"] = docs["analyses-panel"] = doc;
    state.pos = doc.position === doc.tokens.length - 1 && state.pos === null ? null : doc.position;
    renderAnalysis();
    const renderMs = performance.now() - t0;
    window.hexrayTimings = { analysisMs: t0 - started, renderMs };
    window.hexrayLab.analyses += 1;
    status(`${doc.tokens.length} tokens · analysed in ${((t0 - started) / 1000).toFixed(2)} s · drawn in ${renderMs.toFixed(0)} ms`);
    writeURL();
    if (state.head) await loadHead(state.head);
  } catch (e) {
    showError(e.message);
  } finally {
    $("run").disabled = false;
  }
}

function renderAnalysis() {
  renderViews();
  renderTokens();
  renderDLA();
  renderLens();
  renderResidual();
}

function renderTokens() {
  const box = $("tokens");
  box.replaceChildren();
  if (!analysis) return;
  analysis.tokens.forEach((t, i) => {
    const span = document.createElement("span");
    span.className = "tok" + (i === analysis.position ? " sel" : "");
    span.dataset.pos = String(i);
    span.textContent = t.replace(/\n/g, "↵").replace(/\t/g, "⇥");
    span.addEventListener("mousemove", (e) => {
      const top = (analysis.predictions || [])[i] || [];
      tip(e, [`position ${i}: ${showTok(t)}   next token:`, ...top.map((p) => `  ${p.prob.toFixed(3)}  ${showTok(p.token)}`)].join("\n"));
    });
    span.addEventListener("mouseleave", (e) => tip(e, ""));
    span.addEventListener("click", () => { state.pos = i; runAnalysis(); });
    box.append(span);
  });
  const ex = $("explained");
  ex.replaceChildren();
  const label = (text) => { const s = document.createElement("span"); s.textContent = text; return s; };
  const target = analysis.target, contrast = analysis.contrast;
  ex.append(label(`explaining position ${analysis.position} → ${contrast ? "logit diff" : "logit"} of ${showTok(target.token)} (p=${target.prob.toFixed(3)})${contrast ? ` − ${showTok(contrast.token)}` : ""} = ${analysis.value.toFixed(3)}.  candidates:`));
  for (const p of (analysis.predictions || [])[analysis.position] || []) {
    const c = document.createElement("span");
    c.className = "cand";
    c.textContent = `${showTok(p.token)} ${p.prob.toFixed(3)}`;
    for (const [role, input] of [["target", "target"], ["contrast", "contrast"]]) {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = role;
      b.title = `make ${showTok(p.token)} the ${role}`;
      b.addEventListener("click", () => { $(input).value = p.token; runAnalysis(); });
      c.append(b);
    }
    ex.append(c);
  }
}

function headGrid(doc) {
  // rows = layers; columns = heads (if any) then one attention-total column when there are none, then MLP
  const info = doc.model_info;
  const heads = doc.head_scores;
  const nHeadCols = heads ? info.n_heads : 1;
  const cell = (r, c) => (c < nHeadCols ? (heads ? heads[r][c] : doc.layer_totals.attn[r]) : doc.layer_totals.mlp[r]);
  return { info, heads, nHeadCols, cell };
}

// The layers x (heads | attn) + MLP map; cell(r, c) is null where a layer has not arrived yet. Returns the colour scale.
function drawHeadMap(nLayers, nHeadCols, headLabels, cell, mark = []) {
  const values = [];
  for (let r = 0; r < nLayers; r++) for (let c = 0; c <= nHeadCols; c++) values.push(cell(r, c));
  const scale = maxAbs(values);
  drawGrid($("dla-map"), {
    rows: nLayers, cols: nHeadCols + 1, cw: 30, ch: 16, gapBefore: nHeadCols,
    rowLabels: rowNames(nLayers), colLabels: [...headLabels, "MLP"],
    color: (r, c) => diverging(cell(r, c), scale),
    mark,
  });
  return scale;
}

function renderDLA() {
  if (!analysis) { emptyCanvas($("dla-map"), "run an analysis"); return; }
  const { info, heads, nHeadCols, cell } = headGrid(analysis);
  const [sl, sh] = state.head ? state.head.slice(1).split("H").map(Number) : [null, null];
  const headLabels = heads ? Array.from({ length: nHeadCols }, (_, i) => `H${i}`) : ["attn"];
  const scale = drawHeadMap(info.n_layers, nHeadCols, headLabels, cell, [{ r: sl, c: sh }]);
  const err = analysis.reconstruction_error;
  const s = $("sumcheck");
  s.replaceChildren();
  const ok = document.createElement("span");
  ok.className = "ok";
  ok.textContent = err < 1e-3 ? "✓ " : "✗ ";
  s.append(ok, `the ${analysis.components.length} parts (heads, MLPs, embeddings, biases) add up to ${analysis.value.toFixed(4)} = the ${analysis.contrast ? "logit difference" : "logit"}; error ${err.toExponential(1)} · scale ±${scale.toFixed(2)}`);
  const list = $("dla-top");
  list.replaceChildren();
  for (const c of analysis.components.slice(0, 12)) {
    const li = document.createElement("li");
    li.className = c.score >= 0 ? "pos" : "neg";
    li.textContent = `${c.name.padEnd(9)} ${fmt(c.score)}`;
    list.append(li);
  }
}

function drawPartialDLA(nLayers) {
  if (!partialHeads.length || !partialHeads[0].heads) return;
  const nHeads = partialHeads[0].heads.length;
  const cell = (r, c) => (partialHeads[r] ? (c < nHeads ? partialHeads[r].heads[c] : partialHeads[r].mlp) : null);
  drawHeadMap(nLayers, nHeads, Array.from({ length: nHeads }, (_, i) => `H${i}`), cell);
}

function dlaDescribe({ r, c }) {
  const { nHeadCols, heads, cell } = headGrid(analysis);
  const name = c < nHeadCols ? (heads ? `L${r}H${c}` : `attention L${r}`) : `MLP${r}`;
  return `${name}: ${fmt(cell(r, c))}${c < nHeadCols && heads ? "\nclick: attention pattern · shift-click: add to ablation" : ""}`;
}

function dlaClick({ r, c }, event) {
  const { nHeadCols, heads } = headGrid(analysis);
  const name = c < nHeadCols ? (heads ? `L${r}H${c}` : null) : `MLP${r}`;
  if (!name) return;
  if (event.shiftKey) {
    const parts = $("components").value.split(",").map((p) => p.trim()).filter(Boolean);
    if (!parts.includes(name)) parts.push(name);
    $("components").value = parts.join(", ");
    writeURL();
    return;
  }
  if (c < nHeadCols) loadHead(name);
}

const LENS_WINDOW = 48;  // lens columns: the positions up to the explained one (the lens costs a vocab product each)

function renderLens() {
  const canvas = $("lens-grid");
  const res = analysis && analysis.residual, lens = analysis && analysis.logit_lens;
  if (!res || !lens) { emptyCanvas(canvas, "run an analysis"); return; }
  const cols = res.lens_positions, nRows = res.rows.length;
  const fit = Math.floor((canvas.parentElement.clientWidth - 150) / cols.length);  // fit the panel when cells stay readable
  const cw = Math.max(30, Math.min(58, fit));
  drawGrid(canvas, {
    rows: nRows, cols: cols.length, cw, ch: 16, rotate: true,
    rowLabels: res.rows, colLabels: cols.map((p) => showTok(analysis.tokens[p])),
    color: (r, c) => sequential(res.lens_top_probs[r][c]),
    text: (r, c) => showTok(res.lens_top_tokens[r][c]),
    markCol: cols.indexOf(analysis.position), mark: [],
    extraW: 90,
    extra: (ctx, x, y, ch) => {
      ctx.textAlign = "left";
      ctx.fillStyle = css("--dim");
      ctx.fillText(`rank of ${clip(showTok(lens.target.token), 8)}`, x, y - 9);
      lens.layers.forEach((row, r) => {
        ctx.fillStyle = row.target_rank === 0 ? css("--accent") : css("--fg");
        ctx.fillText(`${String(row.target_rank).padStart(5)}  ${row.target_prob.toFixed(2)}`, x, y + r * ch + ch / 2);
      });
    },
  });
  const [x] = canvas.cellCenter(0, Math.max(0, cols.indexOf(analysis.position)));
  canvas.parentElement.scrollLeft = Math.max(0, x + 130 - canvas.parentElement.clientWidth);  // the explained column and ranks in view
}

function lensDescribe({ r, c }) {
  const res = analysis.residual, pos = res.lens_positions[c];
  const lines = [`after ${res.rows[r]}, position ${pos} ${showTok(analysis.tokens[pos])}`, `top: ${showTok(res.lens_top_tokens[r][c])} ${res.lens_top_probs[r][c].toFixed(3)}`];
  if (pos === analysis.position) {
    const row = analysis.logit_lens.layers[r];
    lines.push(`target ${showTok(analysis.logit_lens.target.token)}: rank ${row.target_rank}, p=${row.target_prob.toFixed(3)}`);
    for (const t of row.top) lines.push(`  ${t.prob.toFixed(3)} ${showTok(t.token)}`);
  }
  return lines.join("\n");
}

function renderResidual() {
  const canvas = $("resid-chart");
  const res = analysis && analysis.residual;
  if (!res) { emptyCanvas(canvas, "run an analysis"); return; }
  const p = analysis.position;
  drawLines(canvas, res.rows, [
    { label: "|resid|", values: res.resid_norm.map((row) => row[p]), color: css("--accent") },
    { label: "|attn out|", values: [null, ...res.attn_delta_norm.map((row) => row[p])], color: css("--neg") },
    { label: "|mlp out|", values: [null, ...res.mlp_delta_norm.map((row) => row[p])], color: css("--pos") },
    { label: "p(target), lens", values: analysis.logit_lens.layers.map((l) => l.target_prob), color: css("--sel"), axis: "right" },
  ]);
}

// ---------------------------------------------------------------- a head's attention pattern
let headDoc = null;

async function loadHead(name) {
  const m = /^L(\d+)H(\d+)$/.exec(name);
  if (!m || !analysis) return;
  state.head = name;
  writeURL();
  renderDLA();
  $("head-name").textContent = `${name} loading…`;
  try {
    headDoc = await post("/api/attention", { prompt: analysis.prompt, layer: Number(m[1]), head: Number(m[2]) });
    docs["head-panel"] = headDoc;
    renderHead();
  } catch (e) {
    $("head-name").textContent = name;
    showError(e.message);
  }
}

function renderHead() {
  const canvas = $("attn-map");
  if (!headDoc) { emptyCanvas(canvas, "click a head in the attribution map"); return; }
  $("head-name").textContent = `${headDoc.name} · rows: query position, columns: key position`;
  const table = $("role-scores");
  table.replaceChildren();
  const head = table.insertRow(), vals = table.insertRow();
  for (const [role, v] of Object.entries(headDoc.scores)) {
    const th = document.createElement("th"); th.textContent = role.replace("_", " "); head.append(th);
    vals.insertCell().textContent = v === null ? "—" : v.toFixed(3);
  }
  const n = headDoc.tokens.length;
  const cs = Math.max(3, Math.min(26, Math.floor(900 / n)));
  const labels = headDoc.tokens.map(showTok);
  drawGrid(canvas, {
    rows: n, cols: n, cw: cs, ch: cs, rotate: true, rowLabels: labels.map((l) => clip(l, 14)), colLabels: labels,
    color: (r, c) => (c > r ? css("--bg") : sequential(headDoc.pattern[r][c])),
  });
}

function headDescribe({ r, c }) {
  if (c > r) return "";
  return `${showTok(headDoc.tokens[r])} (${r}) → ${showTok(headDoc.tokens[c])} (${c}): ${headDoc.pattern[r][c].toFixed(3)}`;
}

// ---------------------------------------------------------------- patching
let patchSocket = null;

async function runPatching() {
  showError("");
  const body = { clean: $("clean").value, corrupt: $("corrupt").value, sweep: $("sweep").value, method: $("method").value };
  if ($("target").value) body.target = $("target").value;
  if ($("contrast").value) body.contrast = $("contrast").value;
  state.ran.add("patch");
  writeURL();
  const bar = $("patch-progress");
  bar.hidden = false;
  bar.value = 0;
  bar.removeAttribute("value");  // indeterminate until the first progress message
  $("patch-run").disabled = true;
  status("patching…");
  try {
    patchSocket = stream("/ws/patch", body, (m) => { bar.max = m.total; bar.value = m.done; status(`patching… ${m.done}/${m.total} variants`); });
    const doc = await patchSocket.done;
    docs["patch-panel"] = doc;
    const sweeps = [...new Set(doc.results.map((p) => p.sweep))];
    const view = $("patch-view");
    view.replaceChildren(...sweeps.map((s) => { const o = document.createElement("option"); o.textContent = s; return o; }));
    if (sweeps.includes(state.view)) view.value = state.view;
    bar.max = 1; bar.value = 1;
    renderPatching();
    status(`patched ${doc.results.length} sites`);
  } catch (e) {
    showError(e.message);
    bar.hidden = true;
  } finally {
    $("patch-run").disabled = false;
  }
}

function patchGrid(doc, sweep) {
  const rows = doc.results.filter((p) => p.sweep === sweep);
  const info = doc.model_info;
  if (sweep === "heads") {
    return { rows: info.n_layers, cols: info.n_heads, rowLabels: rowNames(info.n_layers), colLabels: Array.from({ length: info.n_heads }, (_, i) => `H${i}`),
      at: (p) => [p.layer, p.head], sites: rows };
  }
  const positions = [...new Set(rows.map((p) => p.position))].sort((a, b) => a - b);
  const colOf = new Map(positions.map((p, i) => [p, i]));
  const colLabels = positions.map((p) => showTok(doc.clean_tokens[p]));
  if (sweep === "heads-pos") {
    return { rows: info.n_layers * info.n_heads, cols: positions.length, colLabels,
      rowLabels: Array.from({ length: info.n_layers * info.n_heads }, (_, i) => `L${Math.floor(i / info.n_heads)}H${i % info.n_heads}`),
      at: (p) => [p.layer * info.n_heads + p.head, colOf.get(p.position)], sites: rows };
  }
  const nRows = Math.max(...rows.map((p) => p.layer)) + 1;
  return { rows: nRows, cols: positions.length, rowLabels: rowNames(nRows), colLabels, at: (p) => [p.layer, colOf.get(p.position)], sites: rows };
}

function rowNames(n) { return Array.from({ length: n }, (_, i) => `L${i}`); }

let patchCells = null;

function renderPatching() {
  const canvas = $("patch-map"), doc = docs["patch-panel"];
  if (!doc) { emptyCanvas(canvas, "pick clean and corrupt prompts, then Patch"); return; }
  const sweep = $("patch-view").value || doc.results[0].sweep;
  state.view = sweep;
  const g = patchGrid(doc, sweep);
  patchCells = Array.from({ length: g.rows }, () => new Array(g.cols).fill(null));
  for (const p of g.sites) { const [r, c] = g.at(p); patchCells[r][c] = p; }
  const scale = maxAbs(g.sites.map((p) => p.score));
  const cw = g.cols > 40 ? Math.max(6, Math.floor(900 / g.cols)) : 26;
  drawGrid(canvas, {
    rows: g.rows, cols: g.cols, cw, ch: g.rows > 100 ? 4 : 14, rotate: sweep !== "heads",
    rowLabels: g.rowLabels, colLabels: g.colLabels,
    color: (r, c) => diverging(patchCells[r][c] ? patchCells[r][c].score : null, scale),
  });
  const corr = doc.correlation ? ` · attribution vs exact r=${(doc.correlation.all ?? NaN).toFixed(3)}` : "";
  $("patch-summary").textContent = `${doc.metric} of ${showTok(doc.target.token)}${doc.contrast ? ` vs ${showTok(doc.contrast.token)}` : ""}: clean ${doc.clean_value.toFixed(3)}, corrupt ${doc.corrupt_value.toFixed(3)} · ${doc.method}${corr}`;
  const list = $("patch-top");
  list.replaceChildren();
  const top = [...g.sites].sort((a, b) => Math.abs(b.score) - Math.abs(a.score)).slice(0, 10);
  for (const p of top) {
    const li = document.createElement("li");
    li.className = p.score >= 0 ? "pos" : "neg";
    const where = p.position === null || p.position === undefined ? "" : `@${p.position}`;
    li.textContent = `${(p.name + where).padEnd(12)} ${fmt(p.score)}`;
    list.append(li);
  }
  writeURL();
}

function patchDescribe({ r, c }) {
  const p = patchCells && patchCells[r][c];
  if (!p) return "";
  const doc = docs["patch-panel"];
  const where = p.position === null || p.position === undefined ? "all positions" : `position ${p.position} ${showTok(doc.clean_tokens[p.position])}`;
  return `${p.name} at ${where}: ${fmt(p.score)}${p.attribution !== undefined ? `\nattribution estimate ${fmt(p.attribution)}` : ""}`;
}

// ---------------------------------------------------------------- ablation
async function runAblation() {
  showError("");
  const body = { prompt: $("prompt").value, components: $("components").value, mode: $("mode").value, top_k: 8 };
  if ($("target").value) body.target = $("target").value;
  if ($("contrast").value) body.contrast = $("contrast").value;
  if (state.pos !== null) body.token_index = state.pos;
  state.ran.add("ablate");
  writeURL();
  $("ablate-run").disabled = true;
  status("ablating…");
  try {
    docs["ablate-panel"] = await post("/api/ablate", body);
    renderAblation();
    status("ablated");
  } catch (e) {
    showError(e.message);
  } finally {
    $("ablate-run").disabled = false;
  }
}

function renderAblation() {
  const doc = docs["ablate-panel"], canvas = $("ablate-chart");
  if (!doc) { emptyCanvas(canvas, "list components (or shift-click heads), then Ablate"); return; }
  const rows = new Map();
  for (const t of doc.before.top) rows.set(t.id, { label: t.token, before: t.prob, after: null });
  for (const t of doc.after.top) rows.set(t.id, { ...(rows.get(t.id) || { label: t.token, before: null }), after: t.prob });
  for (const d of [doc.before, doc.after]) {  // a token in only one top list: its probability from the other side's target/contrast when known
    for (const t of [d.target, d.contrast].filter(Boolean)) {
      const row = rows.get(t.id);
      if (row) row[d === doc.before ? "before" : "after"] ??= t.prob;
    }
  }
  drawPairedBars(canvas, [...rows.values()]);
  const t0 = doc.before.target, t1 = doc.after.target;
  const diff = doc.before.logit_diff !== null ? ` · logit diff ${doc.before.logit_diff.toFixed(3)} → ${doc.after.logit_diff.toFixed(3)}` : "";
  $("ablate-summary").textContent = `${doc.mode}-ablated ${doc.components.map((c) => c.name + (c.position === null ? "" : `@${c.position}`)).join(", ")}: ${showTok(t0.token)} p ${t0.prob.toFixed(3)} → ${t1.prob.toFixed(3)}, logit ${t0.logit.toFixed(2)} → ${t1.logit.toFixed(2)}${diff} · KL ${doc.kl.toFixed(4)}`;
}

// ---------------------------------------------------------------- generation
let genSocket = null;
let genTokens = [];

async function runGeneration() {
  showError("");
  const body = { prompt: $("prompt").value, max_new_tokens: Number($("max-new").value), chat: $("chat").checked };
  if ($("watch").value.trim()) body.watch = $("watch").value;
  state.ran.add("gen");
  writeURL();
  genTokens = [];
  const box = $("gen-text");
  box.replaceChildren();
  const prompt = document.createElement("span");
  prompt.className = "prompt";
  prompt.textContent = body.chat ? "" : body.prompt;
  box.append(prompt);
  $("gen-detail").textContent = "";
  $("gen-run").disabled = true;
  $("gen-stop").disabled = false;
  status("generating…");
  genSocket = stream("/ws/generate", body, (m) => {
    genTokens.push(m);
    const span = document.createElement("span");
    span.className = "gtok" + (m.crossed.length ? " crossed" : "");
    span.dataset.index = String(m.index);
    span.textContent = m.token;
    span.style.background = mix(css("--cell"), css("--accent"), 0.5 * (1 - m.prob));  // shaded by surprise
    span.addEventListener("click", () => showGenToken(m.index));
    box.append(span);
    showGenToken(m.index);
    status(`generating… ${m.index + 1} tokens`);
  });
  try {
    const done = await genSocket.done;
    docs["gen-panel"] = { tokens: genTokens, ...done };
    status(`generated ${genTokens.length} tokens (${done.stop_reason})`);
  } catch (e) {
    if (e.message !== "stopped") showError(e.message);
    else status(`stopped after ${genTokens.length} tokens`);
    docs["gen-panel"] = { tokens: genTokens, done: false };
  } finally {
    $("gen-run").disabled = false;
    $("gen-stop").disabled = true;
  }
}

function showGenToken(index) {
  const m = genTokens[index];
  if (!m) return;
  for (const el of $("gen-text").querySelectorAll(".gtok.sel")) el.classList.remove("sel");
  const el = $("gen-text").querySelector(`.gtok[data-index="${index}"]`);
  if (el) el.classList.add("sel");
  const watch = Object.entries(m.watch).map(([k, v]) => `${k} ${fmt(v)}`).join("  ");
  $("gen-detail").textContent = `#${m.index} ${showTok(m.token)}  p=${m.prob.toFixed(3)}  top: ${m.top.map((c) => `${c.name} ${fmt(c.score, 2)}`).join("  ")}${watch ? `\nwatched: ${watch}` : ""}${m.crossed.length ? `  crossed: ${m.crossed.join(", ")}` : ""}`;
}

// ---------------------------------------------------------------- exports: every panel gives PNG and JSON
function download(name, blob) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}

// Panels made of text (tokens, generation) are drawn onto a canvas line by line for their PNG.
function textFigure(lines) {
  const c = document.createElement("canvas");
  const ctx = sizeCanvas(c, Math.min(1800, 20 + 7 * Math.max(...lines.map((l) => l.length), 10)), 24 + 16 * lines.length);
  ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, c.width, c.height);
  ctx.fillStyle = css("--fg");
  lines.forEach((l, i) => ctx.fillText(l, 10, 16 + 16 * i));
  return c;
}

function figureOf(panel) {
  switch (panel.id) {
    case "tokens-panel":
      return analysis && textFigure([...wrap(analysis.tokens.map(showTok).join("|"), 200), $("explained").textContent]);
    case "gen-panel":
      return genTokens.length && textFigure([...wrap($("gen-text").textContent, 160), ...$("gen-detail").textContent.split("\n")]);
    default: {
      const canvas = panel.querySelector("canvas.figure");
      const text = [...panel.querySelectorAll(".sumcheck, .toplist, table.roles")].map((e) => e.innerText).join("\n").split("\n").filter(Boolean);
      if (!canvas || !canvas.width) return null;
      const dpr = window.devicePixelRatio || 1;
      const out = document.createElement("canvas");
      const w = canvas.width / dpr, h = canvas.height / dpr;
      const ctx = sizeCanvas(out, Math.max(w, 400), h + 24 + 15 * text.length);
      ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, out.width, out.height);
      ctx.fillStyle = css("--fg");
      ctx.fillText(`${panel.dataset.title} — ${analysis ? clip(analysis.prompt, 90) : ""}`, 6, 10);
      ctx.drawImage(canvas, 0, 20, w, h);
      text.forEach((l, i) => ctx.fillText(l, 6, h + 32 + 15 * i));
      return out;
    }
  }
}

function wrap(text, n) {
  const out = [];
  for (let i = 0; i < text.length; i += n) out.push(text.slice(i, i + n));
  return out.length ? out : [""];
}

function addExports() {
  for (const panel of document.querySelectorAll(".panel[data-title]")) {
    const box = panel.querySelector(".exports");
    const slug = panel.id.replace("-panel", "");
    const png = document.createElement("button");
    png.type = "button"; png.textContent = "PNG"; png.dataset.export = "png"; png.title = "save this panel as a PNG";
    png.addEventListener("click", () => {
      const fig = figureOf(panel);
      if (!fig) { showError("nothing to export yet in this panel"); return; }
      fig.toBlob((blob) => download(`hexray-${slug}.png`, blob), "image/png");
    });
    const json = document.createElement("button");
    json.type = "button"; json.textContent = "JSON"; json.dataset.export = "json"; json.title = "save this panel's data as JSON";
    json.addEventListener("click", () => {
      const doc = docs[panel.id];
      if (!doc) { showError("nothing to export yet in this panel"); return; }
      download(`hexray-${slug}.json`, new Blob([JSON.stringify(doc, null, 1)], { type: "application/json" }));
    });
    box.append(png, json);
  }
}

// ---------------------------------------------------------------- wiring
function redrawAll() {
  if (!document.body) return;
  renderAnalysis();
  renderHead();
  renderPatching();
  renderAblation();
}

function applyPreset(name) {
  const p = PRESETS[name];
  if (!p) return;
  $("prompt").value = p.prompt;
  $("target").value = p.target;
  $("contrast").value = p.contrast;
  $("clean").value = p.clean;
  $("corrupt").value = p.corrupt;
  if (p.components) $("components").value = p.components;
  state.pos = null;
  state.head = null;
  headDoc = null;
  renderHead();
  runAnalysis();
}

async function init() {
  addExports();
  readURL();
  hover($("dla-map"), (h) => (analysis ? dlaDescribe(h) : ""), (h, e) => analysis && dlaClick(h, e));
  hover($("attn-map"), (h) => (headDoc ? headDescribe(h) : ""));
  hover($("lens-grid"), (h) => (analysis ? lensDescribe(h) : ""), (h) => { state.pos = analysis.residual.lens_positions[h.c]; runAnalysis(); });
  hover($("patch-map"), (h) => patchDescribe(h));
  $("run").addEventListener("click", () => { state.pos = null; runAnalysis(); });
  $("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { state.pos = null; runAnalysis(); } });
  $("preset").addEventListener("change", (e) => applyPreset(e.target.value));
  $("theme").addEventListener("click", () => { state.theme = state.theme === "dark" ? "light" : "dark"; applyTheme(); writeURL(); });
  $("patch-run").addEventListener("click", runPatching);
  $("patch-view").addEventListener("change", renderPatching);
  $("ablate-run").addEventListener("click", runAblation);
  $("gen-run").addEventListener("click", runGeneration);
  $("gen-stop").addEventListener("click", () => genSocket && genSocket.close());
  for (const id of Object.values(FIELDS)) $(id).addEventListener("change", writeURL);
  redrawAll();
  try {
    const health = await (await fetch("/api/health")).json();
    const info = health.model_info;
    $("model-badge").textContent = `${health.model} · ${info.n_layers}L × ${info.n_heads}H · d=${info.d_model}`;
    if (info.weights) $("model-badge").title = `weights: ${info.weights}`;
    const defaults = await (await fetch("/api/options")).json();  // one source of defaults: the server's options
    const maxNew = defaults.generate.find((o) => o.name === "max_new_tokens");
    if (maxNew && !new URLSearchParams(location.search).has("gen_n")) $("max-new").value = maxNew.default;
    await loadRegistry();
  } catch {
    $("model-badge").textContent = "server unreachable";
  }
  if ($("prompt").value) {  // a shared view: redo what it showed
    await runAnalysis();
    if (state.ran.has("ablate") && $("components").value) await runAblation();
    if (state.ran.has("patch") && $("clean").value && $("corrupt").value) await runPatching();
    if (state.ran.has("gen")) await runGeneration();
  }
}

init();
