// The status page: fetch api/overview every few seconds and draw it. No library, no
// build step. Every value from the daemon goes into the page as text (textContent),
// never as markup: file names and messages come from outside.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 180, PAD = { left: 52, right: 8, top: 10, bottom: 24 };
const NUMBER = new Intl.NumberFormat("en");
const KINDS = {
  importing: ["I", "ours, importing"],
  queued: ["Q", "ours, queued"],
  creating: ["C", "ours, being created"],
  foreign: ["O", "another integration's"],
  phantom: ["?", "held by a create of unknown outcome"],
  unknown: ["–", "not ours: another integration's, or free (Marketo does not say)"],
  free: ["·", "free"],
};

const $ = (id) => document.getElementById(id);
const fmt = (n) => (n === null || n === undefined ? "?" : NUMBER.format(n));

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

function replace(node, children) {
  node.replaceChildren(...children);
}

function clock(stamp) {
  return stamp ? new Date(stamp).toLocaleTimeString([], { hour12: false }) : "";
}

function duration(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.round(s / 60);
  return m < 60 ? `${m} min` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

// -- the queue ----------------------------------------------------------------------

function slotItems(slots) {
  return slots.map((slot, i) => {
    const [glyph, words] = KINDS[slot.kind] || ["", slot.kind];
    const owner = slot.daemon ? ` (${slot.daemon})` : "";
    const item = el("li", null, { class: `slot ${slot.kind}`, title: words + owner });
    item.append(el("span", glyph, { "aria-hidden": "true" }));
    item.append(el("span", `place ${i + 1}: ${words}${owner}`, { class: "visually-hidden" }));
    return item;
  });
}

function drawQueue(queue) {
  if (!queue) {
    $("queue-summary").textContent = "Not known yet: the daemon is recovering.";
    replace($("import-slots"), []);
    replace($("queue-slots"), []);
    replace($("legend"), []);
    return;
  }
  const parts = queue.daemons.map(
    (d) => `${d.name}: ${d.importing} importing, ${d.queued} queued` +
      (d.creating ? `, ${d.creating} being created` : ""),
  );
  let text = `${parts.join("; ")}. Other integrations: ${queue.foreign}. ` +
    `Unknown creates: ${queue.phantoms}. Free: ${queue.free} of ${queue.places}. ` +
    `Our ceiling: ${queue.limit} jobs.`;
  if (queue.backoff_seconds > 0) text += ` Backing off for ${duration(queue.backoff_seconds)}.`;
  $("queue-summary").textContent = text;
  replace($("import-slots"), slotItems(queue.import_slots));
  replace($("queue-slots"), slotItems(queue.slots));
  const counts = {};
  for (const s of [...queue.slots, ...queue.import_slots]) counts[s.kind] = (counts[s.kind] || 0) + 1;
  replace($("legend"), Object.keys(KINDS).filter((k) => counts[k]).map((kind) => {
    const item = el("li");
    item.append(el("span", KINDS[kind][0], { class: `slot ${kind}`, "aria-hidden": "true" }));
    item.append(el("span", KINDS[kind][1]));
    return item;
  }));
}

// One counter of a <dl>: its name and its value, kept together in a <div>.
function term([label, value, id]) {
  const pair = el("div");
  pair.append(el("dt", label), el("dd", fmt(value), { id }));
  return pair;
}

// -- files --------------------------------------------------------------------------

function drawFiles(data) {
  const t = data.totals;
  const active = ["claiming", "claimed", "splitting", "split", "finishing"]
    .reduce((sum, s) => sum + (t.files[s] || 0), 0);
  const pairs = [
    ["In flight", active, "files-active"],
    ["Complete", t.files.complete, "files-complete"],
    ["Failed", t.files.failed, "files-failed"],
    ["Our jobs at Marketo", t.jobs_outstanding, "jobs-outstanding"],
    ["Chunks done", t.chunks.complete + t.chunks.failed, "chunks-done"],
    ["Chunks in all", Object.values(t.chunks).reduce((a, b) => a + b, 0), "chunks-all"],
  ];
  replace($("totals"), pairs.map(term));
  const rows = data.files.map((f) => {
    const tr = el("tr", null, { "data-id": f.id });
    const cells = [
      ["route", f.route],
      ["file", f.file],
      ["state", f.state],
      ["waiting", f.waiting_for || (f.error ? f.error : "")],
      ["chunks", `${fmt(f.chunks_done)}/${fmt(f.chunks_total)}`],
      ["rows", `${fmt(f.rows_processed)}/${fmt(f.rows)}`],
      ["failed", fmt(f.rows_failed)],
    ];
    for (const [field, value] of cells) {
      const cell = el(field === "file" ? "th" : "td", value, { "data-field": field });
      if (field === "file") cell.setAttribute("scope", "row");
      if (field === "state") cell.className = `state ${f.state}`;
      tr.append(cell);
    }
    return tr;
  });
  if (!rows.length) {
    const empty = el("tr");
    empty.append(el("td", "No files yet.", { colspan: "7" }));
    rows.push(empty);
  }
  replace($("files").tBodies[0], rows);
}

function drawHeld(held) {
  $("held-section").hidden = !held.length;
  replace($("held"), held.map((h) => el("li", `${h.route}/${h.file} chunk ${h.chunk}: ${h.reason}`)));
}

// -- charts -------------------------------------------------------------------------

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

// Rates between points at least `gap` seconds apart (the newest point is read live).
function rates(points, column, gap) {
  const out = [];
  let base = points[0];
  for (const p of points.slice(1)) {
    const dt = p[0] - base[0];
    if (dt < gap) continue;
    out.push([p[0], Math.max(0, p[column] - base[column]) / dt]);
    base = p;
  }
  return out;
}

// Calls in the `span` seconds up to each point (Marketo's window, so the limit lines
// compare like with like); scaled down where the points are further apart than that.
function windowCounts(points, column, span) {
  const out = [];
  let j = 0;
  for (let i = 1; i < points.length; i++) {
    const p = points[i];
    while (j + 1 < i && points[j + 1][0] <= p[0] - span) j++;
    const dt = p[0] - points[j][0];
    if (dt > 0) out.push([p[0], Math.max(0, p[column] - points[j][column]) * Math.min(1, span / dt)]);
  }
  return out;
}

function drawChart(node, series, lines, now, unit) {
  const since = series.length ? Math.min(series[0][0], now - 60) : now - 60;
  const span = Math.max(60, now - since);
  const top = Math.max(1, ...series.map((p) => p[1]), ...lines.map((l) => l.value)) * 1.1;
  const x = (t) => PAD.left + ((t - (now - span)) / span) * (W - PAD.left - PAD.right);
  const y = (v) => H - PAD.bottom - (v / top) * (H - PAD.top - PAD.bottom);
  const parts = [
    svg("line", { x1: PAD.left, y1: y(0), x2: W - PAD.right, y2: y(0), class: "axis" }),
    svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: y(0), class: "axis" }),
  ];
  const label = (text, attrs) => { const t = svg("text", attrs); t.textContent = text; return t; };
  parts.push(label(fmt(Math.round(top)), { x: PAD.left - 4, y: PAD.top + 8, class: "tick end" }));
  parts.push(label("0", { x: PAD.left - 4, y: y(0), class: "tick end" }));
  parts.push(label(`${duration(span)} ago`, { x: PAD.left, y: H - 6, class: "tick" }));
  parts.push(label("now", { x: W - PAD.right, y: H - 6, class: "tick end" }));
  for (const line of lines) {
    parts.push(svg("line", { x1: PAD.left, y1: y(line.value), x2: W - PAD.right, y2: y(line.value), class: line.kind }));
  }
  if (series.length) {
    const d = series.map((p, i) => `${i ? "L" : "M"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join("");
    parts.push(svg("path", { d, class: "series" }));
    const [t, v] = series[series.length - 1];
    parts.push(svg("circle", { cx: x(t).toFixed(1), cy: y(v).toFixed(1), r: 3, class: "latest" }));
  }
  replace(node, parts);
  if (!series.length) return "Collecting data: the first rate shows after a few seconds.";
  const latest = series[series.length - 1][1];
  const peak = Math.max(...series.map((p) => p[1]));
  return `Latest ${fmt(Math.round(latest))} ${unit}; peak ${fmt(Math.round(peak))} ${unit}, ` +
    `over the last ${duration(span)}.`;
}

function drawRates(data) {
  const r = data.rates;
  const now = Date.parse(data.now) / 1000;
  const gap = r.sample_seconds / 2;
  const rowText = drawChart($("rows-chart"), rates(r.points, 1, gap), [], now, "rows/s");
  $("rows-text").textContent = rowText;
  const seconds = r.window_seconds;
  const lines = [
    { value: r.budget_per_window, kind: "budget" },
    { value: r.limit_per_window, kind: "limit" },
  ];
  const unit = `calls per ${fmt(seconds)} s`;
  $("calls-h").textContent = `API calls per ${fmt(seconds)} s, against the budget`;
  const callText = drawChart($("calls-chart"), windowCounts(r.points, 2, seconds), lines, now, unit);
  $("calls-text").textContent = `${callText} Our budget: ${fmt(r.budget_per_window)}; ` +
    `Marketo's limit: ${fmt(r.limit_per_window)} ${unit}.`;
  const t = data.totals;
  const pairs = [
    ["API calls since start", t.api_calls, "api-calls"],
    ["Rows processed (finished files)", t.rows.processed, "rows-processed"],
    ["Rows failed (finished files)", t.rows.failed, "rows-failed"],
    ["Rows rejected before upload", t.rows.rejected, "rows-rejected"],
  ];
  replace($("counters"), pairs.map(term));
}

// -- quota and failures -------------------------------------------------------------

function drawQuota(data) {
  const q = data.quota;
  const bar = $("quota-bar");
  bar.max = q.daily_limit;
  bar.value = Math.min(q.calls_today, q.daily_limit);
  const share = q.daily_limit ? (100 * q.calls_today) / q.daily_limit : 0;
  const left = (Date.parse(q.resets_at) - Date.parse(data.now)) / 1000;
  $("quota-text").replaceChildren(
    el("span", fmt(q.calls_today), { id: "calls-today" }),
    ` of ${fmt(q.daily_limit)} calls (${share.toFixed(1)} %) counted today; ` +
      `resets at ${clock(q.resets_at)} your time (midnight ${q.reset_tz}), in ${duration(left)}.`,
  );
  const sub = q.subscription;
  $("quota-subscription").hidden = !sub;
  if (sub) {
    $("quota-subscription").textContent =
      `The subscription's own count (every integration): ${fmt(sub.used)} of ${fmt(sub.quota)}` +
      (sub.reserve !== undefined ? `, ${fmt(sub.reserve)} kept for others` : "") +
      (sub.read_at ? `; read at ${clock(sub.read_at)}.` : ".") +
      (sub.creates_paused ? ` No new job is created: ${sub.reason}` : "");
  }
}

function drawFailures(f) {
  replace($("failed-files"), f.files.length ? f.files.map((x) =>
    el("li", `${x.route}/${x.file} (${clock(x.finished_at)}): ${x.error || "failed"}`)) : [el("li", "None.")]);
  replace($("failed-chunks"), f.chunks.length ? f.chunks.map((c) =>
    el("li", `${c.route}/${c.file} chunk ${c.chunk}` + (c.batch_id ? ` (batch ${c.batch_id})` : "") +
      `: ${c.message || "failed"}`)) : [el("li", "None.")]);
  const codes = Object.entries(f.errors);
  replace($("errors"), codes.length ? codes.map(([code, n]) => el("li", `${code}: ${fmt(n)}`)) : [el("li", "None.")]);
}

// -- the loop -----------------------------------------------------------------------

function draw(data) {
  const ready = data.ready.ready ? "ready" : `not ready: ${data.ready.reason}`;
  $("summary").textContent = `Version ${data.version}, ${ready}. Data as of ${clock(data.now)}` +
    (data.truncated ? "; more files than shown (see /jobs)." : ".");
  drawQueue(data.queue);
  drawFiles(data);
  drawHeld(data.held || []);
  drawRates(data);
  drawQuota(data);
  drawFailures(data.failures);
}

let every = 2000;
let timer = null;

async function refresh() {
  timer = null;
  try {
    const response = await fetch("api/overview", { cache: "no-store" });
    if (!response.ok) throw new Error(`the daemon answered ${response.status}`);
    const data = await response.json();
    const asked = Number(new URLSearchParams(location.search).get("refresh"));
    every = 1000 * (asked >= 0.5 && asked <= 60 ? asked : data.refresh_seconds);
    draw(data);
    if ($("connection").textContent) $("connection").textContent = "";
  } catch (error) {
    $("connection").textContent = `No answer from the daemon (${error.message}); trying again.`;
  }
  schedule();
}

function schedule() {
  if (timer === null && $("auto-refresh").checked) timer = setTimeout(refresh, every);
}

document.addEventListener("DOMContentLoaded", () => {
  $("auto-refresh").addEventListener("change", () => {
    if ($("auto-refresh").checked) refresh();
    else if (timer !== null) { clearTimeout(timer); timer = null; }
  });
  refresh();
});
