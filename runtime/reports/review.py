"""The review page of one slide: every cell as scanned, grouped by class, reclassified by key or click.

Laid out as haematology staff know it from review stations (CellaVision's): one group per class,
flagged and uncertain cells first in each; number keys move the selected cell to a class, Enter
confirms it; the differential and its Rümke 95 % intervals (the exact binomial interval, as in
CLSI H20-A2) follow every change. The reviewer's work is exported as a JSON file in the
``cytoedge-review`` format (docs/review-format.md), carrying the slide's and the model's hashes, which
``cytoedge compare``, ``calibrate`` and ``adapt`` read.

One self-contained file: the cells' JPEG views and heatmap overlays are inlined as data in the page
and attached to an image only when it scrolls into view, so a 2,000-cell slide stays usable; no
server, no CDN, no network. Progress is kept in the browser's local storage until exported.
"""
from __future__ import annotations

import base64
import hashlib
import html
import json

from cytoedge.runtime.review_export import REVIEW_FORMAT, REVIEW_FORMAT_VERSION

FLAG_ORDER = ("abnormal", "anomalous", "uncertain")


def _b64(data: bytes | None, mime: str) -> str | None:
    return None if data is None else f"data:{mime};base64,{base64.b64encode(data).decode()}"


def review_data(entry: dict, audit: dict, views: dict, overlays: dict[int, bytes], run: dict | None = None) -> dict:
    """What the page's script reads: the slide, the model's identity, the run (``created``, scoring
    ``options``), the classes and every cell (pure)."""
    run = run or {}
    results_created = run.get("created")
    summary = entry.get("summary") or {}
    classes = list(summary.get("by_class") or {})
    settings = audit.get("estimator_settings") or {}
    cells = []
    for c in entry.get("cells", []):
        probs = c.get("probabilities") or {}
        view = views.get(c["id"])
        detail = c.get("estimator_detail") or {}
        cells.append({
            "id": c["id"], "predicted": c["class"], "runner_up": c.get("runner_up"),
            "p": probs.get(c["class"]), "p_abnormal": detail.get("abnormal_probability"),
            "top": sorted(probs.items(), key=lambda kv: -kv[1])[:3],
            "flags": [k for k in FLAG_ORDER if c["flags"].get(k)],
            "confidence": detail.get("confidence_label"), "set": c.get("prediction_set") or [],
            "anomaly": c.get("anomaly_score"), "field": c.get("field"), "centre": c.get("centre"),
            "img": _b64(view.jpeg, "image/jpeg") if view is not None else None,
            "px": view.source_px if view is not None else None,
            "overlay": _b64(overlays.get(c["id"]), "image/png"),
        })
    calls = json.dumps([[c["id"], c["predicted"]] for c in cells])
    return {
        # Progress kept in the browser is this page's only: file:// pages share one local storage.
        "page_id": hashlib.sha256(f"{entry['source']}|{entry.get('source_sha256')}|{audit.get('bundle_sha256')}|"
                                  f"{results_created}|{calls}".encode()).hexdigest(),
        "flag_order": list(FLAG_ORDER), "results_created": results_created, "scoring_options": run.get("options"),
        "format": REVIEW_FORMAT, "format_version": REVIEW_FORMAT_VERSION,
        "source": entry["source"], "source_sha256": entry.get("source_sha256"),
        "um_per_px": (summary.get("scale") or {}).get("um_per_px"),
        "model": audit.get("model"), "bundle_sha256": audit.get("bundle_sha256"),
        "calibration_sha256": settings.get("calibration_sha256"), "cytoedge_version": audit.get("cytoedge_version"),
        "classes": classes, "differential_classes": list(summary.get("differential_classes") or summary.get("differential") or classes),
        "triage": (summary.get("triage") or {}).get("level"), "domain_alarm": bool((summary.get("domain_alarm") or {}).get("raised")),
        "cells_without_view": sum(1 for c in cells if c["img"] is None), "cells": cells,
        "red_cells": ({"classified": red["red_cells_classified"], "provisional": red["provisional"],
                       "corrected": "adjusted_percent" in next(iter(red["grades"].values()), {}),
                       "grades": {f: [g.get("adjusted_percent", g["percent"]), g["grade"]]
                                  for f, g in red["grades"].items()}}
                      if (red := summary.get("red_cells")) else None),
    }


def render_review(entry: dict, audit: dict, views: dict, overlays: dict[int, bytes], run: dict | None = None) -> str:
    """The page as one HTML string (``run``: the results document's ``created`` and scoring ``options``)."""
    data = json.dumps(review_data(entry, audit, views, overlays, run), separators=(",", ":"))
    # Nothing in the data block may open or close markup (a file name with "<!--<script" would).
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return (_PAGE.replace("__TITLE__", html.escape(entry["source"]))
            .replace("__DATA__", data).replace("__STYLE__", _STYLE).replace("__SCRIPT__", _SCRIPT))


_STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#f6f6f4}
header{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid #ccc;padding:6px 14px;display:flex;
gap:14px;align-items:center;flex-wrap:wrap}
header h1{font-size:16px;margin:0}.badge{padding:2px 8px;border-radius:4px;color:#fff;font-weight:600}
.routine{background:#2a7}.review{background:#d90}.urgent{background:#c22}.alarm{background:#833}
#wrap{display:flex;align-items:flex-start}main{flex:1;padding:8px 14px}
aside{width:420px;position:sticky;top:48px;padding:8px 14px;max-height:calc(100vh - 60px);overflow:auto;
background:#fff;border-left:1px solid #ddd}
section h2{font-size:15px;margin:14px 0 6px}.grid{display:flex;flex-wrap:wrap;gap:6px}
figure{margin:0;width:132px;background:#fff;border:2px solid #ddd;border-radius:4px;cursor:pointer;outline:none}
figure.sel{border-color:#06c;box-shadow:0 0 0 2px #06c}figure.confirmed{border-color:#2a7}
figure.reclassified{border-color:#a3c}.pic{position:relative;width:128px;height:128px;background:#eee}
.pic img{position:absolute;left:0;top:0;width:128px;height:128px;image-rendering:auto}
.ov{display:none}.heat .ov{display:block}figcaption{font-size:11px;padding:2px 3px;line-height:1.3}
.fl{display:inline-block;font-size:10px;padding:0 3px;border-radius:3px;color:#fff;margin-right:2px}
.fl-abnormal{background:#c22}.fl-anomalous{background:#e80}.fl-uncertain{background:#b90}
.was{color:#a3c;font-weight:600}table{border-collapse:collapse;font-size:12px;width:100%}
td,th{border-bottom:1px solid #eee;padding:2px 4px;text-align:right}td:first-child,th:first-child{text-align:left}
kbd{border:1px solid #bbb;border-radius:3px;padding:0 3px;font-size:11px;background:#f3f3f3}
#detail img{width:256px;height:256px}#detail .pic{width:256px;height:256px}button{font-size:13px}
.small{font-size:11px;color:#555}.pick button{font-size:11px;margin:1px}
"""

_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>cytoedge review — __TITLE__</title><style>__STYLE__</style></head><body>
<header><h1>Review: __TITLE__</h1><span id="triage" class="badge"></span><span id="progress"></span>
<button id="heat" title="show or hide the heatmaps (H)">Heatmaps (H)</button>
<label class="small">reviewer <input id="reviewer" size="10"></label>
<button id="export" title="download the corrections as JSON">Export corrections</button>
<a id="download" style="display:none"></a></header>
<div id="wrap"><main id="groups"></main><aside>
<h3>Differential (live)</h3><table id="diff"></table>
<p class="small">model: cells by the model's class; reviewed: by the reader's class (unreviewed cells keep the
model's). 95 % interval: Rümke (exact binomial, CLSI H20-A2) on the reviewed count.</p>
<div id="red"></div><h3>Selected cell</h3><div id="detail" class="small">click a cell, or use the arrow keys</div>
<h3>Keys</h3><p class="small" id="keys"></p>
<p class="small">red overlay: pixels where the predicted class explains the cell better than the runner-up; blue:
where the runner-up does; drawn only inside the cell, for flagged cells.</p>
<p class="small">Research software: a decision aid, not a diagnosis.</p></aside></div>
<script type="application/json" id="review-data">__DATA__</script>
<script>__SCRIPT__</script></body></html>
"""

_SCRIPT = r"""
"use strict";
const D = JSON.parse(document.getElementById("review-data").textContent);
const K = D.classes, byId = new Map(D.cells.map(c => [c.id, c]));
const store = "cytoedge-review:" + D.page_id;
const state = new Map(D.cells.map(c => [c.id, {label: null, status: "unreviewed"}]));
let selected = null, order = [];
try { const saved = JSON.parse(localStorage.getItem(store) || "null");  // a label, its status recomputed
  if (saved) for (const [id, s] of saved) if (state.has(id) && K.includes(s.label))
    state.set(id, {label: s.label, status: s.label === byId.get(id).predicted ? "confirmed" : "reclassified"}); } catch (e) {}
const esc = s => String(s).replace(/[&<>"]/g, ch => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[ch]));
const current = c => state.get(c.id).label || c.predicted;

// Rümke 95 % interval: the exact (Clopper-Pearson) binomial interval, from the regularised incomplete beta.
function lgamma(x) { const g = [76.18009172947146, -86.50532032941677, 24.01409824083091, -1.231739572450155,
  0.1208650973866179e-2, -0.5395239384953e-5]; let y = x, t = x + 5.5; t -= (x + 0.5) * Math.log(t);
  let s = 1.000000000190015; for (const c of g) s += c / ++y; return -t + Math.log(2.5066282746310005 * s / x); }
function betacf(a, b, x) { let qab = a + b, qap = a + 1, qam = a - 1, c = 1, d = 1 - qab * x / qap;
  d = 1 / (Math.abs(d) < 1e-30 ? 1e-30 : d); let h = d;
  for (let m = 1; m <= 300; m++) { const m2 = 2 * m; let aa = m * (b - m) * x / ((qam + m2) * (a + m2));
    d = 1 + aa * d; d = 1 / (Math.abs(d) < 1e-30 ? 1e-30 : d); c = 1 + aa / c; if (Math.abs(c) < 1e-30) c = 1e-30; h *= d * c;
    aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)); d = 1 + aa * d; d = 1 / (Math.abs(d) < 1e-30 ? 1e-30 : d);
    c = 1 + aa / c; if (Math.abs(c) < 1e-30) c = 1e-30; const del = d * c; h *= del; if (Math.abs(del - 1) < 1e-12) break; }
  return h; }
function ibeta(a, b, x) { if (x <= 0) return 0; if (x >= 1) return 1;
  const bt = Math.exp(lgamma(a + b) - lgamma(a) - lgamma(b) + a * Math.log(x) + b * Math.log(1 - x));
  return x < (a + 1) / (a + b + 2) ? bt * betacf(a, b, x) / a : 1 - bt * betacf(b, a, 1 - x) / b; }
function betaInv(p, a, b) { let lo = 0, hi = 1; for (let i = 0; i < 60; i++) { const mid = (lo + hi) / 2;
  if (ibeta(a, b, mid) < p) lo = mid; else hi = mid; } return (lo + hi) / 2; }
function rumke(x, n) { if (!n) return [0, 0];
  return [x === 0 ? 0 : betaInv(0.025, x, n - x + 1), x === n ? 1 : betaInv(0.975, x + 1, n - x)]; }

function caption(c) {
  const s = state.get(c.id), flags = c.flags.map(f => `<span class="fl fl-${f}">${f}</span>`).join("");
  const p = c.p == null ? "" : " " + c.p.toFixed(2);
  const was = s.status === "reclassified" ? `<br><span class="was">model: ${esc(c.predicted)}</span>` : "";
  return `#${c.id}${p}${c.runner_up ? " · vs " + esc(c.runner_up) : ""}<br>${flags}${was}`;
}
function figure(c) {
  const f = document.createElement("figure"); f.tabIndex = 0; f.dataset.id = c.id;
  f.className = state.get(c.id).status;
  f.innerHTML = `<div class="pic">${c.img ? `<img alt="cell ${c.id}" data-src="img">` : "<span class=small>no view kept</span>"}` +
    (c.overlay ? `<img class="ov" alt="heatmap ${c.id}" data-src="overlay">` : "") + `</div><figcaption>${caption(c)}</figcaption>`;
  f.addEventListener("click", () => select(c.id));
  lazy.observe(f); return f;
}
const lazy = new IntersectionObserver(entries => { for (const e of entries) if (e.isIntersecting) {
  const c = byId.get(+e.target.dataset.id);
  for (const img of e.target.querySelectorAll("img[data-src]")) { img.src = c[img.dataset.src]; img.removeAttribute("data-src"); }
  lazy.unobserve(e.target); } }, {rootMargin: "600px"});
function rank(c) { const i = D.flag_order.findIndex(f => c.flags.includes(f));
  return [i < 0 ? 3 : i, c.p == null ? 1 : c.p]; }
function before(a, b) { const x = rank(a), y = rank(b); return x[0] - y[0] || x[1] - y[1] || a.id - b.id; }
const figOf = id => document.querySelector(`figure[data-id="${id}"]`);
function section(k) {  // the class's group, made (in class order) when a first cell moves in
  let sec = document.getElementById("class-" + k);
  if (sec) return sec;
  sec = document.createElement("section"); sec.id = "class-" + k;
  sec.innerHTML = `<h2>${esc(k)} <span class="small count"></span></h2><div class="grid"></div>`;
  const later = K.slice(K.indexOf(k) + 1).map(j => document.getElementById("class-" + j)).find(Boolean);
  document.getElementById("groups").insertBefore(sec, later || null); return sec;
}
function recount(k) {
  const sec = document.getElementById("class-" + k); if (!sec) return;
  const n = sec.querySelectorAll("figure").length;
  if (!n) { sec.remove(); return; }
  sec.querySelector(".count").textContent = `(${n}${K.indexOf(k) < 9 ? "; key " + (K.indexOf(k) + 1) : ""})`;
}
function place(c, f) {  // into its group, in rank order
  const grid = section(current(c)).querySelector(".grid");
  const next = [...grid.children].find(g => before(c, byId.get(+g.dataset.id)) < 0);
  grid.insertBefore(f, next || null);
}
function render() {
  document.getElementById("groups").textContent = "";
  for (const c of [...D.cells].sort(before)) section(current(c)).querySelector(".grid").appendChild(figure(c));
  for (const k of K) recount(k);
  order = [...document.querySelectorAll("figure")].map(f => +f.dataset.id);
  document.body.classList.toggle("heat", heat);
  select(selected ?? order[0] ?? null, false); differential();
}
function update(id, s) {  // one cell's review changed: move its figure, not the page
  const c = byId.get(id), was = current(c), f = figOf(id);
  state.set(id, s); save();
  f.className = s.status; f.querySelector("figcaption").innerHTML = caption(c);
  if (current(c) !== was) { place(c, f); recount(was); recount(current(c)); }
  order = [...document.querySelectorAll("figure")].map(g => +g.dataset.id);
  differential();
}
function differential() {
  const dk = D.differential_classes, model = {}, read = {};
  for (const k of K) { model[k] = 0; read[k] = 0; }
  for (const c of D.cells) { model[c.predicted]++; read[current(c)]++; }
  const nm = dk.reduce((s, k) => s + model[k], 0), nr = dk.reduce((s, k) => s + read[k], 0);
  let rows = "<tr><th>class</th><th>key</th><th>model</th><th>%</th><th>reviewed</th><th>%</th><th>95 % interval</th></tr>";
  for (const k of K) { const inDiff = dk.includes(k), [lo, hi] = rumke(read[k], nr);
    rows += `<tr data-class="${esc(k)}"><td>${esc(k)}</td><td><kbd>${K.indexOf(k) + 1}</kbd></td>` +
      `<td>${model[k]}</td><td>${inDiff && nm ? (100 * model[k] / nm).toFixed(1) : "–"}</td><td class="n">${read[k]}</td>` +
      `<td class="pct">${inDiff && nr ? (100 * read[k] / nr).toFixed(1) : "–"}</td>` +
      `<td class="ci">${inDiff && nr ? (100 * lo).toFixed(1) + "–" + (100 * hi).toFixed(1) : "–"}</td></tr>`; }
  document.getElementById("diff").innerHTML = rows;
  const done = [...state.values()].filter(s => s.status !== "unreviewed").length;
  document.getElementById("progress").textContent = `reviewed ${done} of ${D.cells.length}`;
}
function select(id, scroll = true) {
  if (id == null) return; selected = id;
  for (const f of document.querySelectorAll("figure.sel")) f.classList.remove("sel");
  const f = figOf(id); if (!f) return;
  f.classList.add("sel"); if (scroll) { f.focus({preventScroll: true}); f.scrollIntoView({block: "nearest"}); }
  const c = byId.get(id), s = state.get(id);
  const top = c.top.map(([k, p]) => `${esc(k)} ${p.toFixed(3)}`).join("<br>");
  document.getElementById("detail").innerHTML =
    `<div class="pic">${c.img ? `<img alt="cell ${id} enlarged" src="${c.img}">` : ""}` +
    (c.overlay ? `<img class="ov" alt="heatmap" src="${c.overlay}">` : "") + `</div>` +
    `<p><b>#${id}</b> model: <b>${esc(c.predicted)}</b>${c.runner_up ? ", runner-up " + esc(c.runner_up) : ""}<br>${top}` +
    `${c.p_abnormal == null ? "" : "<br>P(abnormal) " + c.p_abnormal.toFixed(3)}` +
    `${c.anomaly == null ? "" : "<br>anomaly score " + c.anomaly.toFixed(2)}` +
    `<br>prediction set: ${c.set.map(esc).join(", ")}${c.confidence ? "<br>model says: " + esc(c.confidence) : ""}` +
    `<br>view: ${c.px || "?"} px as scanned` +
    `<br>review: <b>${s.status}</b>${s.label ? " as " + esc(s.label) : ""}</p>` +
    `<p class="pick"><button data-confirm="1">Confirm ${esc(current(c))} (Enter)</button><br>move to: ` +
    K.map((k, i) => `<button data-class="${esc(k)}">${i + 1} ${esc(k)}</button>`).join(" ") + `</p>`;
}
function save() { try { localStorage.setItem(store, JSON.stringify([...state])); } catch (e) {} }
function assign(id, k) {
  const c = byId.get(id), pos = order.indexOf(id), next = order[pos + 1] ?? order[pos - 1] ?? id;
  update(id, {label: k, status: k === c.predicted ? "confirmed" : "reclassified"});
  select(next);
}
function exportDocument() {
  const counts = {}; for (const k of K) counts[k] = 0;
  for (const c of D.cells) { const s = state.get(c.id); if (s.label) counts[s.label]++; }
  return {format: D.format, format_version: D.format_version, source: D.source, source_sha256: D.source_sha256,
    um_per_px: D.um_per_px, results_created: D.results_created, scoring_options: D.scoring_options,
    bundle_sha256: D.bundle_sha256, calibration_sha256: D.calibration_sha256, model: D.model,
    cytoedge_version: D.cytoedge_version, reviewer: document.getElementById("reviewer").value,
    exported: new Date().toISOString().replace(/\.\d+Z$/, "Z"),
    cells: D.cells.map(c => { const s = state.get(c.id);
      return {id: c.id, predicted: c.predicted, label: s.label, status: s.status, centre: c.centre, field: c.field}; }),
    differential: counts};
}
document.getElementById("detail").addEventListener("click", e => {  // the mouse's way to reclassify
  const b = e.target.closest("button"); if (!b || selected == null) return;
  assign(selected, b.dataset.confirm ? current(byId.get(selected)) : b.dataset.class);
});
let heat = false;
document.getElementById("heat").onclick = () => { heat = !heat; document.body.classList.toggle("heat", heat); };
document.getElementById("export").onclick = () => {
  const a = document.getElementById("download");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(exportDocument(), null, 1)], {type: "application/json"}));
  a.download = "review_" + D.source.split(/[\\/]/).pop().replace(/[^A-Za-z0-9_.-]+/g, "_") + ".json"; a.click();
};
document.addEventListener("keydown", e => {
  if (["INPUT", "BUTTON"].includes(e.target.tagName) || e.ctrlKey || e.metaKey || e.altKey || selected == null) return;
  const pos = order.indexOf(selected);
  if (/^[1-9]$/.test(e.key) && +e.key <= K.length) { assign(selected, K[+e.key - 1]); e.preventDefault(); }
  else if (e.key === "Enter" || e.key === "c") { assign(selected, current(byId.get(selected))); e.preventDefault(); }
  else if (e.key === "Backspace") { update(selected, {label: null, status: "unreviewed"}); select(selected); e.preventDefault(); }
  else if (e.key === "ArrowRight" || e.key === "ArrowDown") { select(order[Math.min(pos + 1, order.length - 1)]); e.preventDefault(); }
  else if (e.key === "ArrowLeft" || e.key === "ArrowUp") { select(order[Math.max(pos - 1, 0)]); e.preventDefault(); }
  else if (e.key === "h" || e.key === "H") { document.getElementById("heat").click(); }
});
const tri = document.getElementById("triage");
tri.textContent = (D.triage || "error").toUpperCase() + (D.domain_alarm ? " · out-of-domain alarm" : "");
tri.className = "badge " + (D.domain_alarm ? "alarm" : (D.triage || ""));
document.getElementById("keys").innerHTML = K.map((k, i) => `<kbd>${i + 1}</kbd> ${esc(k)}`).join(" · ") +
  "<br><kbd>Enter</kbd> confirm · <kbd>Backspace</kbd> undo · <kbd>←</kbd><kbd>→</kbd> move · <kbd>H</kbd> heatmaps" +
  (D.cells_without_view ? `<br>${D.cells_without_view} cells beyond the page's limit are listed without a picture` : "");
if (D.red_cells) document.getElementById("red").innerHTML =
  `<h3>Red cells (${D.red_cells.classified} read${D.red_cells.provisional ? ", provisional" : ""})</h3><table>` +
  `<tr><th>feature</th><th>${D.red_cells.corrected ? "% corrected" : "%"}</th><th>grade</th></tr>` + Object.entries(D.red_cells.grades).map(([f, [p, g]]) =>
    `<tr><td>${esc(f)}</td><td>${p.toFixed(1)}</td><td>${esc(g)}</td></tr>`).join("") + "</table>";
window.cytoedgeReview = {exportDocument, rumke, state};
render();
"""
