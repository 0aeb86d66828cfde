// Drawing: canvases, colours and the tooltip. Everything the server sends is data: text goes in
// with textContent or onto a canvas, never through innerHTML (tokens can contain "<script>").
// Colours: one convention for the lab, the PNGs and the HTML reports (ColorBrewer RdBu, safe for
// colour-blind readers): blue = positive (raises the explained value), red = negative.

export const LEGEND = "blue: raises the explained value · red: lowers it";
export const $ = (id) => document.getElementById(id);

export function css(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }

export function rgb(hex) {
  const h = hex.replace("#", "");
  return [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16));
}

export function mix(a, b, t) {
  const [x, y] = [rgb(a), rgb(b)];
  return `rgb(${x.map((v, i) => Math.round(v + (y[i] - v) * Math.max(0, Math.min(1, t)))).join(",")})`;
}

export function diverging(v, scale) {
  if (v === null || v === undefined || Number.isNaN(v)) return css("--bg");
  return mix(css("--cell"), v >= 0 ? css("--pos") : css("--neg"), Math.sqrt(Math.abs(v) / (scale || 1)));
}

export function sequential(p) { return p === null || p === undefined ? css("--bg") : mix(css("--cell"), css("--accent"), p); }

export function maxAbs(values) {
  let m = 0;
  for (const v of values) if (v !== null && Number.isFinite(v)) m = Math.max(m, Math.abs(v));
  return m || 1;
}

export function fmt(v, digits = 3) { return v === null || v === undefined ? "—" : (v >= 0 ? "+" : "") + v.toFixed(digits); }

export function showTok(t) { return JSON.stringify(t).slice(1, -1); }  // visible spaces and newlines: " Mary", "\n"

export function sizeCanvas(canvas, w, h) {
  const dpr = window.devicePixelRatio || 1;
  const [W, H] = [Math.ceil(w * dpr), Math.ceil(h * dpr)];
  const ctx = canvas.getContext("2d");
  if (canvas.width !== W || canvas.height !== H) {  // a new bitmap and a new layout only when the size changes
    canvas.width = W;
    canvas.height = H;
    canvas.style.width = `${w}px`;
    canvas.style.height = `${h}px`;
  }
  ctx.setTransform(1, 0, 0, 1, 0, 0);
  ctx.clearRect(0, 0, W, H);
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.textAlign = "left";
  ctx.font = "11px ui-monospace, 'DejaVu Sans Mono', monospace";
  ctx.textBaseline = "middle";
  return ctx;
}

export function clip(text, n) { return text.length > n ? `${text.slice(0, n - 1)}…` : text; }

// A grid of cells with row and column labels; returns nothing, but sets canvas.hit(x, y) -> {r, c} | null.
export function drawGrid(canvas, g) {
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

export function emptyCanvas(canvas, text) {
  const ctx = sizeCanvas(canvas, 360, 40);
  ctx.fillStyle = css("--dim");
  ctx.fillText(text, 4, 20);
  canvas.hit = () => null;
}

// Line chart: series [{label, values, color, axis: "left" | "right"}] over x labels.
export function drawLines(canvas, xLabels, series, { width = 560, height = 240, rightMax = 1 } = {}) {
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
export function drawPairedBars(canvas, rows, { width = 560 } = {}) {
  const rowH = 22, left = 130, top = 20;
  const height = top + rows.length * rowH + 6;
  const ctx = sizeCanvas(canvas, width, height);
  ctx.fillStyle = css("--panel");
  ctx.fillRect(0, 0, width, height);
  const scale = (width - left - 120) / Math.max(1e-9, ...rows.flatMap((r) => [r.before ?? 0, r.after ?? 0]));
  ctx.fillStyle = css("--dim"); ctx.textAlign = "left";
  ctx.fillText("■ before", left, 8); ctx.fillStyle = css("--accent"); ctx.fillText("■ after", left + 90, 8);
  rows.forEach((row, i) => {
    const y = top + i * rowH;
    ctx.fillStyle = css("--fg"); ctx.textAlign = "right";
    ctx.fillText(clip(showTok(row.label), 16), left - 6, y + rowH / 2);
    ctx.fillStyle = css("--dim");
    ctx.fillRect(left, y + 2, (row.before ?? 0) * scale, 8);
    ctx.fillStyle = css("--accent");
    ctx.fillRect(left, y + 11, (row.after ?? 0) * scale, 8);
    ctx.fillStyle = css("--fg"); ctx.textAlign = "left";
    ctx.fillText(`${(row.before ?? 0).toFixed(3)} → ${(row.after ?? 0).toFixed(3)}`, left + Math.max(row.before ?? 0, row.after ?? 0) * scale + 6, y + rowH / 2);
  });
}

// ---------------------------------------------------------------- tooltip
export function tip(event, text) {
  const el = $("tip");
  if (!text) { el.hidden = true; return; }
  el.textContent = text;
  el.hidden = false;
  const x = Math.min(event.clientX + 14, window.innerWidth - el.offsetWidth - 8);
  const y = Math.min(event.clientY + 14, window.innerHeight - el.offsetHeight - 8);
  el.style.left = `${x}px`;
  el.style.top = `${y}px`;
}

export function hover(canvas, describe, onClick) {
  const at = (e) => {
    const box = canvas.getBoundingClientRect();
    return canvas.hit ? canvas.hit(e.clientX - box.left, e.clientY - box.top) : null;
  };
  canvas.addEventListener("mousemove", (e) => { const h = at(e); tip(e, h ? describe(h) : ""); canvas.style.cursor = h && onClick ? "pointer" : "default"; });
  canvas.addEventListener("mouseleave", (e) => tip(e, ""));
  if (onClick) canvas.addEventListener("click", (e) => { const h = at(e); if (h) onClick(h, e); });
}

export function rowNames(n) { return Array.from({ length: n }, (_, i) => `L${i}`); }

export function wrap(text, n) {
  const out = [];
  for (let i = 0; i < text.length; i += n) out.push(text.slice(i, i + n));
  return out.length ? out : [""];
}

// Panels made of text (tokens, generation) are drawn onto a canvas line by line for their PNG.
export function textFigure(lines) {
  const c = document.createElement("canvas");
  const ctx = sizeCanvas(c, Math.min(1800, 20 + 7 * Math.max(...lines.map((l) => l.length), 10)), 24 + 16 * lines.length);
  ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, c.width, c.height);
  ctx.fillStyle = css("--fg");
  lines.forEach((l, i) => ctx.fillText(l, 10, 16 + 16 * i));
  return c;
}

// A panel's canvas with its title and its text lines under it, as one PNG.
export function canvasFigure(panel, canvas, title) {
  if (!canvas || !canvas.width) return null;
  const text = [...panel.querySelectorAll(".sumcheck, .toplist, table.roles, .legend")].map((e) => e.innerText).join("\n").split("\n").filter(Boolean);
  const dpr = window.devicePixelRatio || 1;
  const out = document.createElement("canvas");
  const w = canvas.width / dpr, h = canvas.height / dpr;
  const ctx = sizeCanvas(out, Math.max(w, 400), h + 24 + 15 * text.length);
  ctx.fillStyle = css("--panel"); ctx.fillRect(0, 0, out.width, out.height);
  ctx.fillStyle = css("--fg");
  ctx.fillText(title, 6, 10);
  ctx.drawImage(canvas, 0, 20, w, h);
  text.forEach((l, i) => ctx.fillText(l, 6, h + 32 + 15 * i));
  return out;
}

// A table from rows of cells (strings or numbers), written as text; with `unitOf`, a cell it names a unit for opens that unit's card.
export function fillTable(table, header, rows, unitOf = null) {
  table.replaceChildren();
  const head = table.insertRow();
  for (const c of header) { const th = document.createElement("th"); th.textContent = c; head.append(th); }
  for (const row of rows) {
    const tr = table.insertRow();
    for (const v of row) {
      const cell = tr.insertCell();
      cell.textContent = typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(3)) : (v ?? "—");
      const unit = unitOf && typeof v === "string" ? unitOf(v) : null;
      if (unit) cell.dataset.unit = unit;
    }
  }
}

export function listItems(list, items) {  // items: [{text, score, unit?}] -> coloured by sign; a unit's row opens its neuroscope card
  list.replaceChildren(...items.map(({ text, score, unit }) => {
    const li = document.createElement("li");
    li.className = score >= 0 ? "pos" : "neg";
    li.textContent = text;
    if (unit) li.dataset.unit = unit;
    return li;
  }));
}
