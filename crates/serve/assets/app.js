// saekit feature browser: one small script, no dependencies. Every piece of model or corpus text is put in
// the page with textContent, never as HTML.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const app = $("#app");
let INFO = null;
let MAP = null; // cached map points (also used for the density distribution)

function el(tag, attrs = {}, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const k of kids.flat()) if (k != null) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
  return e;
}
const SVGNS = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}, ...kids) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) if (v != null) k === "text" ? (e.textContent = v) : e.setAttribute(k, v);
  for (const k of kids.flat()) if (k) e.append(k);
  return e;
}

async function api(path, body) {
  const opts = body === undefined ? {} : { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  const r = await fetch("/api" + path, opts);
  let j;
  try { j = await r.json(); } catch { throw new Error(`HTTP ${r.status}`); }
  if (!r.ok) throw new Error(j.error || `HTTP ${r.status}`);
  return j;
}

const fmt = (x, d = 2) => (x == null ? "–" : Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(d));
const pct = (p) => (p >= 0.01 ? (100 * p).toFixed(2) + "%" : p >= 1e-5 ? (100 * p).toPrecision(2) + "%" : p > 0 ? (100 * p).toExponential(1) + "%" : "0%");
// tokens as they appear, with whitespace made visible where it would vanish
function showTok(t) {
  if (t === "") return "∅";
  if (/^ +$/.test(t)) return "␣".repeat(t.length);
  return t.replace(/\n/g, "↵\n").replace(/\t/g, "→");
}
function heat(a, max) {
  if (!(a > 0) || !(max > 0)) return "transparent";
  const x = Math.min(1, a / max);
  // white -> orange -> dark orange
  const l = 97 - 55 * x;
  return `hsl(${24 - 6 * x}, ${90}%, ${l}%)`;
}
function textOn(a, max) { return max > 0 && a / max > 0.75 ? "#fff" : null; }

// tooltip
const tip = $("#tip");
function showTip(ev, text) { tip.textContent = text; tip.hidden = false; moveTip(ev); }
function moveTip(ev) {
  const w = tip.offsetWidth, h = tip.offsetHeight;
  let x = ev.clientX + 14, y = ev.clientY + 14;
  if (x + w > innerWidth - 8) x = ev.clientX - w - 14;
  if (y + h > innerHeight - 8) y = ev.clientY - h - 14;
  tip.style.left = x + "px"; tip.style.top = y + "px";
}
function hideTip() { tip.hidden = true; }
function hover(node, textFn) {
  node.addEventListener("mouseenter", (e) => showTip(e, textFn()));
  node.addEventListener("mousemove", moveTip);
  node.addEventListener("mouseleave", hideTip);
  return node;
}

function tokenSpan(t, a, max, extra = "") {
  const s = el("span", { class: "tok" + extra, text: showTok(t) });
  s.style.background = heat(a, max);
  const fg = textOn(a, max);
  if (fg) s.style.color = fg;
  s.dataset.act = a;
  return hover(s, () => `${JSON.stringify(t)}\nactivation ${fmt(a, 3)}`);
}

// Byte-level BPE splits many characters (CJK, accents, emoji) across tokens, each stored with its dangling
// bytes escaped as \xNN. Consecutive tokens whose bytes complete a character are shown as that character,
// carrying their highest activation; the per-token view is in the hover. A backslash typed in the text
// ("\x41" in code) is text: saekit escapes only bytes that are not UTF-8 where they stand, so a token whose
// decoded bytes would not escape back to it was written that way (as saekit_analysis::render reads it).
const utf8 = new TextEncoder(), strictUtf8 = new TextDecoder("utf-8", { fatal: true });
function tokenBytes(t) {
  const out = [];
  let escapes = 0;
  for (let i = 0; i < t.length;) {
    const m = /^\\x([0-9a-fA-F]{2})/.exec(t.slice(i, i + 4));
    if (m) { out.push(parseInt(m[1], 16)); i += 4; escapes++; continue; }
    const ch = String.fromCodePoint(t.codePointAt(i));
    out.push(...utf8.encode(ch)); i += ch.length;
  }
  return escapes && escapeInvalid(out) !== t ? [...utf8.encode(t)] : out;
}
function decodeOrNull(bytes) { try { return strictUtf8.decode(new Uint8Array(bytes)); } catch { return null; } }
// The bytes as saekit's tokenizer shows them: UTF-8 where it is, each other byte as \xNN.
function escapeInvalid(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length;) {
    let n = 1;
    while (n <= 4 && i + n <= bytes.length && decodeOrNull(bytes.slice(i, i + n)) === null) n++;
    if (n <= 4 && i + n <= bytes.length) { s += decodeOrNull(bytes.slice(i, i + n)); i += n; }
    else { s += "\\x" + bytes[i].toString(16).padStart(2, "0"); i += 1; }
  }
  return s;
}
function mergeTokens(tokens, acts) {
  const out = [];
  let pend = [], first = 0, act = 0;
  const flush = (end) => {
    out.push({ text: decodeOrNull(pend) ?? tokens.slice(first, end).join(""), act, first, len: end - first });
    pend = [];
  };
  tokens.forEach((t, i) => {
    const b = tokenBytes(t);
    if (pend.length && !(b.length && (b[0] & 0xc0) === 0x80)) flush(i);
    if (!pend.length) { first = i; act = -Infinity; }
    pend.push(...b); act = Math.max(act, acts[i] || 0);
    if (decodeOrNull(pend) === null && i + 1 - first < 4 && i + 1 < tokens.length) return;
    flush(i + 1);
  });
  return out;
}

function contextRow(c, scaleMax) {
  const toks = el("span", { class: "toks" });
  for (const p of mergeTokens(c.tokens, c.acts)) {
    const peak = c.peak >= p.first && c.peak < p.first + p.len;
    if (p.len === 1) { toks.append(tokenSpan(c.tokens[p.first], c.acts[p.first], scaleMax, peak ? " peak" : "")); continue; }
    const s = tokenSpan(p.text, p.act, scaleMax, (peak ? " peak" : "") + " joined");
    const per = c.tokens.slice(p.first, p.first + p.len).map((t, k) => `  ${JSON.stringify(t)}  ${fmt(c.acts[p.first + k], 3)}`);
    hover(s, () => `${JSON.stringify(p.text)}\nactivation ${fmt(p.act, 3)} (highest of ${p.len} tokens)\n${per.join("\n")}`);
    toks.append(s);
  }
  return el("div", { class: "ctx" }, el("span", { class: "val", text: fmt(c.max_act) }), toks);
}

// An LLM explanation with its detection / fuzzing scores (balanced accuracy, with the counts in the hover).
function scoreChip(name, s) {
  if (!s) return el("span", { class: "chip muted", text: `${name}: not scored` });
  if (s.tp + s.fn + s.tn + s.fp === 0) return el("span", { class: "chip muted", text: `${name}: no answer could be read (${s.unparsed} unparsed)` });
  const chip = el("span", { class: "chip score", text: `${name} ${s.balanced_accuracy.toFixed(2)}` });
  return hover(chip, () => `${name}: balanced accuracy ${s.balanced_accuracy.toFixed(3)}\n` +
    `activating: ${s.tp} found, ${s.fn} missed\nothers: ${s.tn} rejected, ${s.fp} accepted` + (s.unparsed ? `\n${s.unparsed} unparsed` : ""));
}
function llmExplanations(list) {
  if (!list || !list.length) return null;
  const [best, ...rest] = list;
  const box = el("div", { class: "explain llm", id: "llm-explanation" },
    el("b", { text: "LLM explanation: " }), best.text, " ",
    el("span", { class: "muted", text: `(${best.model})` }), " ", scoreChip("detection", best.detection), " ", scoreChip("fuzzing", best.fuzzing));
  if (rest.length) {
    const d = el("details", {}, el("summary", { text: `${rest.length} more explanation${rest.length > 1 ? "s" : ""}` }));
    for (const e of rest) d.append(el("div", {}, e.text, " ", el("span", { class: "muted", text: `(${e.model})` }), " ", scoreChip("detection", e.detection), " ", scoreChip("fuzzing", e.fuzzing)));
    box.append(d);
  }
  return box;
}

function errorBox(msg) { return el("div", { class: "err", role: "alert", text: msg }); }
function navOn(name) { document.querySelectorAll("[data-nav]").forEach((a) => a.classList.toggle("on", a.dataset.nav === name)); }

// ---------------------------------------------------------------- plots (SVG, drawn by hand)

function barChart(edges, counts, { w = 320, h = 150, color = "#f97316", logx = true, title = "" } = {}) {
  const m = { l: 34, r: 8, t: 8, b: 26 };
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, width: "100%", class: "plot", "data-kind": title });
  if (!counts || counts.length === 0) {
    root.append(svg("text", { x: w / 2, y: h / 2, "text-anchor": "middle", text: "no activations recorded" }));
    return root;
  }
  const maxc = Math.max(...counts);
  const pw = w - m.l - m.r, ph = h - m.t - m.b;
  const n = counts.length;
  root.append(svg("line", { x1: m.l, y1: m.t + ph, x2: m.l + pw, y2: m.t + ph, stroke: "#9ca3af" }));
  root.append(svg("line", { x1: m.l, y1: m.t, x2: m.l, y2: m.t + ph, stroke: "#9ca3af" }));
  counts.forEach((c, i) => {
    const bh = maxc ? (c / maxc) * ph : 0;
    const r = svg("rect", { x: m.l + (i * pw) / n + 0.5, y: m.t + ph - bh, width: Math.max(1, pw / n - 1), height: bh, fill: color, class: "hbar" });
    hover(r, () => `${fmt(edges[i], 3)} – ${fmt(edges[i + 1], 3)}\n${c} tokens`);
    root.append(r);
  });
  root.append(svg("text", { x: m.l - 4, y: m.t + 8, "text-anchor": "end", text: String(maxc) }));
  root.append(svg("text", { x: m.l - 4, y: m.t + ph, "text-anchor": "end", text: "0" }));
  for (const i of [0, Math.floor(n / 2), n]) {
    root.append(svg("text", { x: m.l + (i * pw) / n, y: h - 12, "text-anchor": "middle", text: fmt(edges[i], 2) }));
  }
  root.append(svg("text", { x: m.l + pw / 2, y: h - 1, "text-anchor": "middle", text: logx ? "activation (log-spaced bins)" : "activation" }));
  return root;
}

// Where this feature's density sits among all features' densities (log10 histogram).
function densityPlot(all, mine, { w = 320, h = 120 } = {}) {
  const vals = all.filter((d) => d > 0).map((d) => Math.log10(d));
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, width: "100%", class: "plot", "data-kind": "density" });
  if (vals.length === 0) return root;
  const lo = Math.floor(Math.min(...vals, mine > 0 ? Math.log10(mine) : 0)), hi = Math.ceil(Math.max(...vals, -0.0001));
  const bins = 30, counts = new Array(bins).fill(0);
  for (const v of vals) counts[Math.min(bins - 1, Math.floor(((v - lo) / (hi - lo || 1)) * bins))]++;
  const m = { l: 10, r: 10, t: 8, b: 26 }, pw = w - m.l - m.r, ph = h - m.t - m.b, maxc = Math.max(...counts);
  counts.forEach((c, i) => root.append(svg("rect", { x: m.l + (i * pw) / bins, y: m.t + ph - (c / maxc) * ph, width: pw / bins - 1, height: (c / maxc) * ph, fill: "#cbd5e1" })));
  root.append(svg("line", { x1: m.l, y1: m.t + ph, x2: m.l + pw, y2: m.t + ph, stroke: "#9ca3af" }));
  for (let e = lo; e <= hi; e++) root.append(svg("text", { x: m.l + ((e - lo) / (hi - lo || 1)) * pw, y: h - 12, "text-anchor": "middle", text: `1e${e}` }));
  root.append(svg("text", { x: m.l + pw / 2, y: h - 1, "text-anchor": "middle", text: "feature density (all features)" }));
  if (mine > 0) {
    const x = m.l + ((Math.log10(mine) - lo) / (hi - lo || 1)) * pw;
    root.append(svg("line", { x1: x, y1: m.t - 2, x2: x, y2: m.t + ph, stroke: "#ea580c", "stroke-width": 2.5, class: "mine" }));
    const right = x > w - 80;
    root.append(svg("text", { x: right ? x - 4 : x + 4, y: m.t + 8, "text-anchor": right ? "end" : "start", text: `this feature (${pct(mine)})`, style: "fill:#ea580c" }));
  }
  return root;
}

function logitBars(rows, color, { w = 320 } = {}) {
  const rh = 17, h = rows.length * rh + 4;
  const root = svg("svg", { viewBox: `0 0 ${w} ${h}`, width: "100%", class: "plot logits" });
  const maxv = Math.max(...rows.map((r) => Math.abs(r.logit)), 1e-9);
  rows.forEach((r, i) => {
    const y = i * rh + 2, bw = (Math.abs(r.logit) / maxv) * (w - 170);
    root.append(svg("text", { x: 0, y: y + 12, text: JSON.stringify(r.token).slice(0, 22), style: "font-family: ui-monospace, monospace; font-size: 11px" }));
    root.append(svg("rect", { x: 120, y: y + 2, width: Math.max(1, bw), height: rh - 5, fill: color, rx: 2 }));
    root.append(svg("text", { x: 124 + bw, y: y + 12, text: fmt(r.logit, 3) }));
  });
  return root;
}

// ---------------------------------------------------------------- home

async function home() {
  navOn("home");
  const params = new URLSearchParams(location.search);
  const q = params.get("q");
  const listCard = el("div", { class: "card", id: "feature-list" });
  const mapCard = el("div", { class: "card" }, el("h2", { text: "Feature map" }),
    el("p", { class: "muted", text: "Decoder directions in 2-D. Scroll to zoom, drag to pan, hover for a feature, click to open it. Colour: log density." }));
  const searchCard = el("div", { class: "card", id: "search-results" });
  app.replaceChildren(...[
    el("h1", { text: "Features" }),
    statsLine(),
    q ? searchCard : null,
    el("div", { class: "grid2" }, listCard, mapCard),
  ].filter(Boolean));
  if (q) runSearch(q, searchCard);
  renderList(listCard, { sort: params.get("sort") || "density", order: "desc", offset: 0 });
  try {
    MAP = MAP || (await api("/map")).points;
    mapCard.append(featureMap(MAP));
  } catch (e) { mapCard.append(errorBox(e.message)); }
}

function statsLine() {
  if (!INFO) return null;
  const db = INFO.db || {};
  const s = el("div", { class: "stats" });
  const add = (v, k) => v != null && s.append(el("div", { class: "stat" }, el("b", { text: String(v) }), el("small", { text: k })));
  add(INFO.n_features, "features");
  add(db.hook_name || (INFO.model && INFO.model.hook), "hook");
  add(db.n_tokens, "tokens analysed");
  add(INFO.model && INFO.model.name, "model");
  add(INFO.live ? "on" : "off", "live model");
  return s;
}

async function runSearch(q, card) {
  card.replaceChildren(el("h2", { text: `Search: ${q}` }), el("span", { class: "spin" }));
  try {
    const r = await api("/search?q=" + encodeURIComponent(q) + "&limit=30");
    const kids = [el("h2", { text: `Search: ${q}` })];
    if (r.id != null) kids.push(el("p", {}, "Feature id: ", el("a", { href: `/feature/${r.id}`, text: `#${r.id}` })));
    kids.push(r.features.length ? summaryTable(r.features, "search") : el("p", { class: "muted", text: "No feature has this in its top contexts." }));
    card.replaceChildren(...kids);
  } catch (e) { card.replaceChildren(errorBox(e.message)); }
}

function summaryTable(rows, sortKey) {
  const maxD = Math.max(...rows.map((r) => r.density), 1e-12);
  const maxA = Math.max(...rows.map((r) => r.max_act), 1e-12);
  const tb = el("tbody");
  for (const r of rows) {
    const b1 = el("div", { class: "bar" }); b1.style.width = (60 * r.density) / maxD + "px";
    const b2 = el("div", { class: "bar" }); b2.style.width = (60 * r.max_act) / maxA + "px"; b2.style.background = "#bfdbfe";
    tb.append(el("tr", { "data-id": r.id },
      el("td", {}, el("a", { href: `/feature/${r.id}`, text: `#${r.id}` })),
      el("td", {}, el("div", { text: pct(r.density) }), b1),
      el("td", {}, el("div", { text: fmt(r.max_act) }), b2),
      el("td", {}, r.top_tokens.map((t) => el("span", { class: "chip", text: showTok(t) })))));
  }
  return el("table", { class: "list", "data-sort": sortKey },
    el("thead", {}, el("tr", {}, el("th", { text: "feature" }), el("th", { text: "density" }), el("th", { text: "max act" }), el("th", { text: "top tokens" }))), tb);
}

async function renderList(card, st) {
  const tab = (key, label) => el("button", { class: st.sort === key ? "on" : "", text: label, "data-sort": key,
    onclick: () => renderList(card, { ...st, sort: key, offset: 0 }) });
  const order = el("button", { text: st.order === "desc" ? "↓ high first" : "↑ low first", onclick: () => renderList(card, { ...st, order: st.order === "desc" ? "asc" : "desc", offset: 0 }) });
  const head = [el("h2", { text: "All features" }), el("div", { class: "tabs" }, tab("density", "Density"), tab("max_act", "Max activation"), tab("id", "Id"), order)];
  card.replaceChildren(...head, el("span", { class: "spin" }));
  try {
    const r = await api(`/features?sort=${st.sort}&order=${st.order}&offset=${st.offset}&limit=25`);
    const pager = el("div", { class: "row" },
      el("button", { class: "btn", text: "← prev", disabled: st.offset === 0 ? "" : null, onclick: () => renderList(card, { ...st, offset: Math.max(0, st.offset - 25) }) }),
      el("span", { class: "muted", text: `${st.offset + 1}–${st.offset + r.features.length} of ${r.total}` }),
      el("button", { class: "btn", text: "next →", disabled: st.offset + 25 >= r.total ? "" : null, onclick: () => renderList(card, { ...st, offset: st.offset + 25 }) }));
    card.replaceChildren(...head, summaryTable(r.features, st.sort), pager);
  } catch (e) { card.replaceChildren(...head, errorBox(e.message)); }
}

function featureMap(points, highlight) {
  const wrap = el("div", { class: "mapwrap" });
  const cv = el("canvas", { class: "map", "data-points": points.length });
  wrap.append(cv);
  const dens = points.map((p) => (p.density > 0 ? Math.log10(p.density) : null)).filter((v) => v != null);
  const dlo = dens.length ? Math.min(...dens) : -6, dhi = dens.length ? Math.max(...dens) : 0;
  let view = { s: 1, tx: 0, ty: 0 };
  let hoverIdx = -1;
  const color = (p) => {
    if (!(p.density > 0)) return "rgba(156,163,175,.6)";
    const t = (Math.log10(p.density) - dlo) / (dhi - dlo || 1);
    return `hsla(${220 - 200 * t}, 80%, ${55 - 10 * t}%, .8)`;
  };
  function toScreen(p, W, H) {
    const pad = 20, sc = Math.min(W, H) / 2 - pad;
    return [W / 2 + (p.x * sc) * view.s + view.tx, H / 2 - (p.y * sc) * view.s + view.ty];
  }
  function draw() {
    const dpr = window.devicePixelRatio || 1, W = cv.clientWidth, H = cv.clientHeight;
    if (!W) return;
    cv.dataset.scale = view.s.toFixed(3);
    cv.width = W * dpr; cv.height = H * dpr;
    const g = cv.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.clearRect(0, 0, W, H);
    const r = Math.max(1.6, Math.min(6, 2.2 * Math.sqrt(view.s) * (points.length > 5000 ? 0.6 : 1)));
    points.forEach((p, i) => {
      const [x, y] = toScreen(p, W, H);
      if (x < -5 || y < -5 || x > W + 5 || y > H + 5) return;
      g.fillStyle = color(p);
      g.beginPath(); g.arc(x, y, i === hoverIdx ? r + 3 : r, 0, 7); g.fill();
    });
    if (highlight != null && points[highlight]) {
      const [x, y] = toScreen(points[highlight], W, H);
      g.strokeStyle = "#ea580c"; g.lineWidth = 2.5; g.beginPath(); g.arc(x, y, 9, 0, 7); g.stroke();
    }
  }
  function nearest(ev) {
    const b = cv.getBoundingClientRect(), mx = ev.clientX - b.left, my = ev.clientY - b.top;
    let best = -1, bd = 100;
    points.forEach((p, i) => {
      const [x, y] = toScreen(p, b.width, b.height);
      const d = (x - mx) ** 2 + (y - my) ** 2;
      if (d < bd) { bd = d; best = i; }
    });
    return best;
  }
  let drag = null, moved = false;
  cv.addEventListener("wheel", (ev) => {
    ev.preventDefault();
    const b = cv.getBoundingClientRect(), mx = ev.clientX - b.left - b.width / 2, my = ev.clientY - b.top - b.height / 2;
    const f = Math.exp(-ev.deltaY * 0.0015), ns = Math.min(200, Math.max(0.5, view.s * f)), k = ns / view.s;
    view = { s: ns, tx: mx - (mx - view.tx) * k, ty: my - (my - view.ty) * k };
    draw();
  }, { passive: false });
  cv.addEventListener("mousedown", (ev) => { drag = { x: ev.clientX, y: ev.clientY, tx: view.tx, ty: view.ty }; moved = false; });
  window.addEventListener("mouseup", () => { drag = null; });
  cv.addEventListener("mousemove", (ev) => {
    if (drag) {
      const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
      if (Math.abs(dx) + Math.abs(dy) > 3) moved = true;
      view.tx = drag.tx + dx; view.ty = drag.ty + dy; draw(); return;
    }
    const i = nearest(ev);
    if (i !== hoverIdx) { hoverIdx = i; draw(); }
    if (i >= 0) { const p = points[i]; showTip(ev, `feature #${p.id}\ndensity ${pct(p.density)}\nmax act ${fmt(p.max_act)}`); cv.style.cursor = "pointer"; }
    else { hideTip(); cv.style.cursor = "grab"; }
  });
  cv.addEventListener("mouseleave", () => { hideTip(); hoverIdx = -1; draw(); });
  cv.addEventListener("click", (ev) => { if (moved) return; const i = nearest(ev); if (i >= 0) go(`/feature/${points[i].id}`); });
  new ResizeObserver(draw).observe(cv);
  const reset = el("button", { class: "btn", text: "reset zoom", onclick: () => { view = { s: 1, tx: 0, ty: 0 }; draw(); } });
  return el("div", {}, wrap, el("div", { class: "row" }, reset,
    el("span", { class: "legend" }, "sparse", el("span", { class: "grad", style: "background: linear-gradient(90deg, hsl(220,80%,55%), hsl(170,80%,52%), hsl(120,80%,50%), hsl(70,80%,48%), hsl(20,80%,45%))" }), "dense")));
}

// ---------------------------------------------------------------- feature page

async function featurePage(id) {
  navOn("home");
  app.replaceChildren(el("h1", { text: `Feature #${id}` }), el("span", { class: "spin" }));
  let f;
  try { f = await api(`/features/${encodeURIComponent(id)}`); }
  catch (e) { app.replaceChildren(el("h1", { text: `Feature #${id}` }), errorBox(e.message), el("a", { href: "/", text: "← all features" })); return; }
  document.title = `#${f.id} · saekit`;
  const n = INFO ? INFO.n_features : null;
  const title = el("div", { class: "titlebar" },
    el("h1", { text: `Feature #${f.id}` }),
    f.id > 0 ? el("a", { class: "btn", href: `/feature/${f.id - 1}`, text: "← prev" }) : null,
    n == null || f.id + 1 < n ? el("a", { class: "btn", href: `/feature/${f.id + 1}`, text: "next →" }) : null,
    el("span", { class: "spacer" }),
    el("a", { class: "btn", href: `/live?feature=${f.id}`, text: "Test on text" }),
    el("a", { class: "btn primary", href: `/steer?feature=${f.id}`, text: "Steer with it" }));
  const stats = el("div", { class: "stats" },
    ...[[pct(f.density), "density"], [fmt(f.max_act, 3), "max activation"], [fmt(f.mean_act, 3), "mean activation (when firing)"]]
      .map(([v, k]) => el("div", { class: "stat" }, el("b", { text: v }), el("small", { text: k }))));
  const llm = llmExplanations(f.explanations);
  const expl = f.explanation ? el("div", { class: "explain", id: "explanation" }, el("b", { text: "Explanation: " }), f.explanation,
    f.explanation_auto ? el("span", { class: "muted", text: "  (automatic, from top tokens)" }) : null) : null;

  // left column: plots, logits, neighbours
  const histCard = el("div", { class: "card", id: "histogram" }, el("h2", { text: "Activation histogram" }),
    barChart(f.histogram.edges, f.histogram.counts, { title: "histogram" }));
  const densCard = el("div", { class: "card", id: "density" }, el("h2", { text: "Density" }));
  const logitCard = el("div", { class: "card", id: "logits" },
    el("h2", { text: "Promoted tokens (direct logit effect)" }), logitBars(f.promoted, "#60a5fa"),
    el("h2", { text: "Suppressed tokens", style: "margin-top: 12px" }), logitBars(f.suppressed, "#f87171"));
  const nb = el("div", { class: "toklist" });
  for (const x of f.neighbours) {
    const b = el("div", { class: "bar" }); b.style.width = Math.max(1, 120 * Math.max(0, x.cosine)) + "px"; b.style.background = "#c7d2fe";
    nb.append(el("a", { href: `/feature/${x.id}`, class: "neighbour", text: `#${x.id}` }), b, el("span", { class: "muted", text: x.cosine.toFixed(3) }));
  }
  const nbCard = el("div", { class: "card", id: "neighbours" }, el("h2", { text: "Nearest features (decoder cosine)" }), nb);

  // right column: contexts
  const top = el("div", { class: "card", id: "top-contexts" }, el("div", { class: "titlebar" }, el("h2", { text: "Top activations" }), el("span", { class: "spacer" }),
    el("span", { class: "legend" }, "0", el("span", { class: "grad" }), fmt(f.max_act))));
  if (f.top_contexts.length === 0) top.append(el("p", { class: "muted", text: "This feature never fired on the analysed tokens (dead)." }));
  f.top_contexts.forEach((c) => top.append(contextRow(c, f.max_act)));
  const qs = el("div", { class: "card", id: "quantiles" }, el("h2", { text: "Activation quantiles" }));
  f.quantiles.forEach((g, i) => {
    const d = el("details", { class: "q" }, el("summary", {}, `Interval ${fmt(g.lo)} – ${fmt(g.hi)} `, el("span", { text: g.count ? `(${g.contexts.length} of ${g.count} activations)` : `(${g.contexts.length} examples)` })));
    if (i < 2) d.open = true;
    g.contexts.forEach((c) => d.append(contextRow(c, f.max_act)));
    qs.append(d);
  });
  app.replaceChildren(...[title, stats, llm, expl].filter(Boolean), el("div", { class: "fgrid" },
    el("div", {}, histCard, densCard, logitCard, nbCard), el("div", {}, top, qs)));
  try {
    MAP = MAP || (await api("/map")).points;
    densCard.append(densityPlot(MAP.map((p) => p.density), f.density));
  } catch (e) { densCard.append(errorBox(e.message)); }
}

// ---------------------------------------------------------------- live text

async function livePage() {
  navOn("live");
  const params = new URLSearchParams(location.search);
  const text = el("textarea", { id: "live-text", spellcheck: "false" });
  text.value = params.get("text") || "The Golden Gate Bridge is in San Francisco. Paris est la capitale de la France.";
  const feat = el("input", { type: "number", id: "live-feature", min: 0, placeholder: "any", style: "width: 100px" });
  if (params.get("feature")) feat.value = params.get("feature");
  const lens = el("input", { type: "checkbox", id: "live-lens" }); lens.checked = true;
  const out = el("div", { id: "live-out" });
  const run = el("button", { class: "btn primary", id: "live-run", text: "Run" });
  const go = async () => {
    run.disabled = true; out.replaceChildren(el("span", { class: "spin" }), " running the model…");
    try {
      const body = { text: text.value, lens: lens.checked, top_k: 5 };
      if (feat.value !== "") body.feature = Number(feat.value);
      renderLive(out, await api("/live", body), (fid) => { feat.value = fid; go(); });
    } catch (e) { out.replaceChildren(errorBox(e.message)); }
    run.disabled = false;
  };
  run.addEventListener("click", go);
  app.replaceChildren(el("h1", { text: "Live text" }),
    el("div", { class: "card" },
      el("p", { class: "muted", text: "Paste text: see the tokens coloured by a feature, the strongest features on each token, and what each layer's residual stream decodes to (logit lens)." }),
      text,
      el("div", { class: "row" }, el("label", {}, "Colour by feature ", feat), el("label", {}, lens, " logit lens"), run)),
    out);
  if (INFO && !INFO.live) out.replaceChildren(errorBox("This server was started without a model and SAE: live text is off."));
}

function renderLive(out, r, pick) {
  const acts = r.feature != null ? r.feature_acts : r.top_features.map((tf) => (tf[0] ? tf[0].act : 0));
  const skip0 = r.tokens.length > 1; // BOS is an attention sink: scale colours without it
  const max = Math.max(...acts.filter((_, i) => !(skip0 && i === 0)), 1e-9);
  const detail = el("div", { class: "card", id: "token-detail" }, el("h2", { text: "Token" }), el("p", { class: "muted", text: "Click a token to see its top features." }));
  const toks = el("div", { class: "ctx", id: "live-tokens" });
  const spans = [];
  r.tokens.forEach((t, i) => {
    const s = tokenSpan(t, acts[i], max);
    s.style.cursor = "pointer";
    s.addEventListener("click", () => { spans.forEach((x) => x.classList.remove("sel")); s.classList.add("sel"); showTokenDetail(detail, r, i, pick); });
    spans.push(s); toks.append(s);
  });
  const label = r.feature != null ? el("span", {}, "coloured by feature ", el("a", { href: `/feature/${r.feature}`, text: `#${r.feature}` })) : "coloured by the strongest feature on each token";
  const overall = el("div", {}, r.overall.map((fa) => el("a", { class: "chip", href: `/feature/${fa.id}`, text: `#${fa.id} ${fmt(fa.act)}`,
    onclick: (e) => { if (!e.ctrlKey && !e.metaKey) { e.preventDefault(); pick(fa.id); } } })));
  const kids = [
    el("div", { class: "grid2" },
      el("div", { class: "card" }, el("h2", {}, "Tokens — ", label), el("div", { class: "toks" }, toks)),
      el("div", {}, detail, el("div", { class: "card", id: "overall" }, el("h2", { text: "Top features in this text (click to colour by it)" }), overall))),
  ];
  if (r.lens && r.lens.length) kids.push(lensTable(r));
  out.replaceChildren(...kids);
}

function showTokenDetail(card, r, i, pick) {
  const rows = r.top_features[i];
  const list = el("div", { class: "toklist" });
  const max = Math.max(...rows.map((x) => x.act), 1e-9);
  for (const fa of rows) {
    const b = el("div", { class: "bar" }); b.style.width = (140 * fa.act) / max + "px";
    list.append(el("a", { href: `/feature/${fa.id}`, text: `#${fa.id}` }), b, el("span", { text: fmt(fa.act, 3) }));
  }
  card.replaceChildren(el("h2", { text: `Token ${i}: ${JSON.stringify(r.tokens[i])}` }),
    rows.length ? list : el("p", { class: "muted", text: "No feature fires here." }));
}

function lensTable(r) {
  const n = r.tokens.length, L = r.lens.length;
  const head = el("tr", {}, el("th", { class: "l", text: "layer" }), r.tokens.map((t) => el("th", { text: showTok(t) })));
  const body = el("tbody");
  for (let l = L - 1; l >= 0; l--) {
    const tr = el("tr", {}, el("th", { class: "l", text: String(l) }));
    for (let p = 0; p < n; p++) {
      const c = r.lens[l][p];
      const td = el("td", { text: showTok(c.token) });
      td.style.background = `rgba(37, 99, 235, ${Math.min(0.85, c.prob).toFixed(3)})`;
      if (c.prob > 0.5) td.style.color = "#fff";
      hover(td, () => `layer ${l}, after ${JSON.stringify(r.tokens[p])}\ntop token ${JSON.stringify(c.token)}  p=${c.prob.toFixed(3)}`);
      tr.append(td);
    }
    body.append(tr);
  }
  return el("div", { class: "card", id: "logit-lens" }, el("h2", { text: "Logit lens: the next token each layer's residual stream predicts (darker = more probable)" }),
    el("div", { class: "lens" }, el("table", {}, el("thead", {}, head), body)));
}

// ---------------------------------------------------------------- steering

async function steerPage() {
  navOn("steer");
  const params = new URLSearchParams(location.search);
  const prompt = el("textarea", { id: "steer-prompt" });
  prompt.value = params.get("prompt") || "Tell me about your favourite place.";
  const chat = el("input", { type: "checkbox", id: "steer-chat" }); chat.checked = true;
  const maxTok = el("input", { type: "number", id: "steer-max", value: 40, min: 1, max: (INFO && INFO.limits.max_new_tokens) || 128, style: "width: 80px" });
  const temp = el("input", { type: "number", id: "steer-temp", value: 0, min: 0, max: 2, step: 0.1, style: "width: 70px" });
  const seed = el("input", { type: "number", id: "steer-seed", value: 0, style: "width: 80px" });
  const edits = el("div", { id: "edits" });
  const addEdit = (fid = "", mode = "clamp", value = 10, unit = "max") => {
    const fe = el("input", { type: "number", class: "e-feature", min: 0, value: fid, placeholder: "feature", style: "width: 100px" });
    const mo = el("select", { class: "e-mode" }, el("option", { value: "clamp", text: "clamp to" }), el("option", { value: "add", text: "add" }));
    mo.value = mode;
    const va = el("input", { type: "number", class: "e-value", value, step: 0.5 });
    const un = el("select", { class: "e-unit" }, el("option", { value: "max", text: "× max act" }), el("option", { value: "abs", text: "absolute" }));
    un.value = unit;
    const row = el("div", { class: "edit" }, "feature #", fe, mo, va, un, el("button", { class: "btn", text: "✕", title: "remove", onclick: () => row.remove() }));
    edits.append(row);
  };
  addEdit(params.get("feature") || "");
  const base = el("div", { class: "gen", id: "baseline" }), steered = el("div", { class: "gen", id: "steered" });
  const msg = el("div");
  const run = el("button", { class: "btn primary", id: "steer-run", text: "Generate" });
  run.addEventListener("click", async () => {
    const body = {
      prompt: prompt.value, chat: chat.checked, max_new_tokens: Number(maxTok.value), temperature: Number(temp.value), seed: Number(seed.value),
      edits: [...edits.querySelectorAll(".edit")].filter((r) => $(".e-feature", r).value !== "").map((r) => ({
        feature: Number($(".e-feature", r).value), mode: $(".e-mode", r).value, value: Number($(".e-value", r).value), unit: $(".e-unit", r).value })),
    };
    run.disabled = true; msg.replaceChildren(el("span", { class: "spin" }), " generating baseline and steered…");
    base.textContent = ""; steered.textContent = "";
    try {
      const r = await api("/steer", body);
      base.textContent = r.baseline; steered.textContent = r.steered;
      msg.replaceChildren(el("p", { class: "muted", text: r.edits.length ? "Edits: " + r.edits.map((e) => `#${e.feature} ${e.mode} ${fmt(e.value, 2)}`).join(", ") : "No edits: both sides are the same model." }));
    } catch (e) { msg.replaceChildren(errorBox(e.message)); }
    run.disabled = false;
  });
  app.replaceChildren(el("h1", { text: "Steering playground" }),
    el("div", { class: "card" },
      el("p", { class: "muted", text: "Clamp a feature's activation (keeping the SAE's error term, as Anthropic did) or add its decoder direction, and compare with the unsteered model: same prompt, same seed." }),
      prompt,
      el("div", { class: "row" }, el("label", {}, chat, " chat template"), el("label", {}, "max tokens ", maxTok), el("label", {}, "temperature ", temp), el("label", {}, "seed ", seed)),
      el("h2", { text: "Feature edits", style: "margin-top: 10px" }), edits,
      el("div", { class: "row" }, el("button", { class: "btn", text: "+ add feature", onclick: () => addEdit() }), run)),
    msg,
    el("div", { class: "grid2" },
      el("div", { class: "card" }, el("h2", { text: "Baseline" }), base),
      el("div", { class: "card" }, el("h2", {}, "Steered ", el("span", { class: "pill", text: "with edits" })), steered)));
  if (INFO && !INFO.live) msg.replaceChildren(errorBox("This server was started without a model and SAE: steering is off."));
}

// ---------------------------------------------------------------- attribution graph

const NODE_KIND = { "cross layer transcoder": "feature", "mlp reconstruction error": "error", embedding: "embedding", logit: "logit" };

async function graphPage() {
  navOn("graph");
  const params = new URLSearchParams(location.search);
  const prompt = el("input", { id: "graph-prompt", type: "text", style: "width: 100%", value: params.get("prompt") || "The capital of France is" });
  const nodeT = el("input", { type: "number", id: "graph-node-threshold", value: 0.8, min: 0.05, max: 1, step: 0.05, style: "width: 80px" });
  const edgeT = el("input", { type: "number", id: "graph-edge-threshold", value: 0.98, min: 0.05, max: 1, step: 0.01, style: "width: 80px" });
  const run = el("button", { class: "btn primary", id: "graph-run", text: "Trace" });
  const msg = el("div"), plot = el("div", { id: "graph-plot" }), side = el("div", { id: "graph-node" });
  run.addEventListener("click", async () => {
    run.disabled = true; msg.replaceChildren(el("span", { class: "spin" }), " attributing through the replacement model…");
    plot.replaceChildren(); side.replaceChildren();
    try {
      const g = await api("/graph", { prompt: prompt.value, node_threshold: Number(nodeT.value), edge_threshold: Number(edgeT.value) });
      const feats = g.nodes.filter((n) => NODE_KIND[n.feature_type] === "feature").length;
      msg.replaceChildren(el("p", { class: "muted", text: `${g.nodes.length} nodes (${feats} features), ${g.links.length} edges; ${fmt(100 * g.metadata.error_influence_share, 1)}% of the influence on the logits flows through error nodes. Click a feature to ablate or clamp it.` }));
      plot.replaceChildren(graphSvg(g, (n) => nodePanel(side, g, n, prompt.value)));
    } catch (e) { msg.replaceChildren(errorBox(e.message)); }
    run.disabled = false;
  });
  app.replaceChildren(el("h1", { text: "Attribution graph" }),
    el("div", { class: "card" },
      el("p", { class: "muted", text: "Which transcoder features cause which on a prompt: attention patterns and norms frozen, every MLP replaced by its transcoder (with its error), edges pruned by influence on the top logits as circuit-tracer does. Interventions re-run the real model." }),
      prompt,
      el("div", { class: "row" }, el("label", {}, "node threshold ", nodeT), el("label", {}, "edge threshold ", edgeT), run)),
    msg, el("div", { class: "card" }, plot), side);
  if (INFO && !(INFO.model && INFO.model.transcoders)) msg.replaceChildren(errorBox("This server has no transcoders (saekit serve --transcoders DIR): graphs are off."));
}

// nodes by layer (rows, embeddings at the bottom, logits on top) and position (columns)
function graphSvg(g, onPick) {
  const layers = (INFO && INFO.model && INFO.model.layers) || 1 + Math.max(0, ...g.nodes.map((n) => Number(n.layer) || 0));
  const toks = g.metadata.prompt_tokens, colW = Math.max(90, Math.min(160, 1100 / toks.length)), rowH = 20;
  const W = 60 + colW * toks.length, H = 40 + rowH * (layers + 2) + 30;
  const row = (n) => (n.layer === "E" ? 0 : NODE_KIND[n.feature_type] === "logit" ? layers + 1 : Number(n.layer) + 1);
  const cells = new Map();
  for (const n of g.nodes) { const k = `${row(n)}:${n.ctx_idx}`; cells.set(k, (cells.get(k) || []).concat([n])); }
  const at = new Map();
  for (const [k, ns] of cells) {
    const [r, c] = k.split(":").map(Number);
    // the logits (all at the last position) spread over the whole width, so their labels can be read
    const [x0, w] = r === layers + 1 ? [50, colW * toks.length] : [50 + c * colW, colW];
    ns.forEach((n, i) => at.set(n.node_id, { x: x0 + w * (i + 1) / (ns.length + 1), y: H - 40 - r * rowH }));
  }
  const root = svg("svg", { class: "graph", width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-nodes": g.nodes.length, "data-links": g.links.length });
  const maxW = Math.max(1e-12, ...g.links.map((l) => Math.abs(l.weight)));
  const edges = svg("g", { class: "edges" });
  for (const l of g.links) {
    const a = at.get(l.source), b = at.get(l.target);
    if (!a || !b) continue;
    edges.append(svg("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, "data-source": l.source, "data-target": l.target,
      stroke: l.weight >= 0 ? "#2563eb" : "#dc2626", "stroke-width": (0.4 + 3.6 * Math.abs(l.weight) / maxW).toFixed(2), "stroke-opacity": 0.35 }));
  }
  root.append(edges);
  toks.forEach((t, c) => root.append(svg("text", { x: 50 + c * colW + colW / 2, y: H - 8, "text-anchor": "middle", class: "axis", text: showTok(t) })));
  for (const r of [0, 10, 20, 29].filter((r) => r < layers)) root.append(svg("text", { x: 4, y: H - 36 - (r + 1) * rowH, class: "axis", text: `L${r}` }));
  for (const n of g.nodes) {
    const p = at.get(n.node_id), kind = NODE_KIND[n.feature_type] || "other";
    const shape = kind === "feature" ? svg("circle", { cx: p.x, cy: p.y, r: 5 }) : svg("rect", { x: p.x - 4, y: p.y - 4, width: 8, height: 8 });
    const node = svg("g", { class: "node " + kind, "data-type": kind, "data-id": n.node_id }, shape);
    if (kind === "logit") node.append(svg("text", { x: p.x, y: p.y - 8, "text-anchor": "middle", class: "axis", text: n.clerp.replace(/^Output /, "") }));
    hover(node, () => nodeText(n, toks));
    if (kind === "feature") node.addEventListener("click", () => {
      root.querySelectorAll("g.node.picked").forEach((x) => x.classList.remove("picked"));
      node.classList.add("picked");
      edges.querySelectorAll("line").forEach((e) => e.setAttribute("stroke-opacity", e.dataset.source === n.node_id || e.dataset.target === n.node_id ? 0.9 : 0.12));
      onPick(n);
    });
    root.append(node);
  }
  return root;
}

function nodeText(n, toks) {
  const kind = NODE_KIND[n.feature_type] || n.feature_type, tok = showTok(toks[n.ctx_idx] || "");
  if (kind === "feature") {
    const f = n.node_id.split("_")[1];
    return `transcoder feature ${f} @ layer ${n.layer}, position ${n.ctx_idx} ("${tok}")\nactivation ${fmt(n.activation, 3)}, influence ${fmt(n.influence, 3)}\npromotes: ${(n.top_tokens || []).map(showTok).join(" · ")}`;
  }
  if (kind === "error") return `MLP error @ layer ${n.layer}, position ${n.ctx_idx} ("${tok}"): what the transcoder misses\ninfluence ${fmt(n.influence, 3)}`;
  if (kind === "embedding") return `token "${tok}" at position ${n.ctx_idx}`;
  return n.clerp;
}

// the picked feature: ablate or clamp it and compare the real model's next tokens
function nodePanel(side, g, n, prompt) {
  const [layer, feature, pos] = n.node_id.split("_").map(Number);
  const value = el("input", { type: "number", id: "graph-clamp-value", value: fmt(2 * (n.activation || 1), 3), step: 0.1, style: "width: 90px" });
  const out = el("div", { id: "graph-intervention" });
  const send = async (v) => {
    out.replaceChildren(el("span", { class: "spin" }), " re-running the model…");
    try {
      const r = await api("/graph/intervene", { prompt, edits: [{ feature, layer, pos, value: v }] });
      const table = (rows) => el("table", { class: "list" }, el("tbody", {}, rows.map((t) => el("tr", {}, el("td", { text: showTok(t.token) }), el("td", { text: fmt(t.prob, 3) })))));
      out.replaceChildren(el("div", { class: "grid2" },
        el("div", {}, el("h2", { text: "Before" }), table(r.before)),
        el("div", {}, el("h2", { text: `After (set to ${fmt(v, 3)})` }), table(r.after))));
    } catch (e) { out.replaceChildren(errorBox(e.message)); }
  };
  side.replaceChildren(el("div", { class: "card" },
    el("h2", { text: `Feature ${feature} of layer ${layer}'s transcoder, position ${pos}` }),
    el("p", { class: "muted", text: `activation ${fmt(n.activation, 3)}; promotes ${(n.top_tokens || []).map(showTok).join(" · ")}` }),
    el("div", { class: "row" },
      el("button", { class: "btn", id: "graph-ablate", text: "Ablate (set to 0)", onclick: () => send(0) }),
      el("label", {}, "clamp to ", value),
      el("button", { class: "btn", id: "graph-clamp", text: "Clamp", onclick: () => send(Number(value.value)) })),
    out));
}

// ---------------------------------------------------------------- routing

function go(path) { history.pushState(null, "", path); route(); }

async function route() {
  hideTip();
  const p = location.pathname;
  const m = p.match(/^\/feature\/([^/]+)$/);
  if (m) return featurePage(decodeURIComponent(m[1]));
  if (p === "/live") return livePage();
  if (p === "/steer") return steerPage();
  if (p === "/graph") return graphPage();
  return home();
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[href^='/']");
  if (!a || e.ctrlKey || e.metaKey || e.shiftKey || e.defaultPrevented || a.target) return;
  e.preventDefault();
  go(a.getAttribute("href"));
});
window.addEventListener("popstate", route);
$("#jump-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const q = $("#jump").value.trim();
  if (!q) return;
  if (/^\d+$/.test(q)) go(`/feature/${q}`); else go(`/?q=${encodeURIComponent(q)}`);
});

(async () => {
  try {
    INFO = await api("/info");
    const db = INFO.db || {};
    $("#sae-info").textContent = [db.hook_name, `${INFO.n_features} features`, INFO.model && INFO.model.name].filter(Boolean).join(" · ");
  } catch (e) { app.replaceChildren(errorBox("Cannot reach the API: " + e.message)); return; }
  route();
})();
