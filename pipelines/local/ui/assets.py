"""The UI's stylesheet and script, served from the package as ``/static/ui.css`` and ``/static/ui.js``.

Plain CSS and vanilla JavaScript (no framework, nothing fetched from a CDN). The script does five things, all by
event delegation so that they keep working after a live update replaces the page content:

- live updates: ``<body data-poll=URL data-signature=S>`` polls URL (JSON ``{"signature", "terminal"}``) every
  2 s and, when the signature changes, re-renders ``#content`` from the page's fresh HTML;
- sortable tables (``table.sortable``: click a header; cells may carry ``data-sort``);
- the "try it" box (``.tryit[data-endpoint]``): a dropped or chosen image is POSTed to ``/api/invoke`` and the
  prediction shown;
- deploy progress (``[data-deploy-poll]``): polls until the endpoint update is done;
- the per-server token on every ``fetch`` POST (forms carry it as a hidden field).
"""

from __future__ import annotations

CSS = """
:root { --ok:#1a7f37; --bad:#cf222e; --run:#0969da; --warn:#bf8700; --off:#8c959f; --idle:#d0d7de; }
* { box-sizing: border-box; }
body {
  margin:0; font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif; color:#1f2328; background:#f6f8fa;; }
header { display:flex; align-items:center; gap:24px; padding:10px 20px; background:#24292f; color:#fff; }
header .brand { font-weight:600; }
header nav a { color:#d0d7de; margin-right:16px; text-decoration:none; }
header nav a.active, header nav a:hover { color:#fff; border-bottom:2px solid #fff; }
main { padding:16px 24px 40px; max-width:1400px; }
h1 { font-size:22px; margin:6px 0 14px; word-break:break-all; }
h2 { font-size:16px; margin:0 0 10px; }
section { background:#fff; border:1px solid #d0d7de; border-radius:8px; padding:14px 16px; margin:0 0 16px; }
a { color:#0969da; }
table { border-collapse:collapse; width:100%; background:#fff; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid #eaeef2; vertical-align:top; }
th { background:#f6f8fa; font-weight:600; white-space:nowrap; }
table.sortable th { cursor:pointer; user-select:none; }
table.sortable th.asc::after { content:" \\25B2"; } table.sortable th.desc::after { content:" \\25BC"; }
table.kv th { width:220px; background:none; color:#57606a; font-weight:500; }
td { word-break:break-word; }
#trials td { word-break:normal; }
tr.best td { background:#fff8c5; font-weight:600; }
tr.selected td { background:#ddf4ff; }
.badge {
  display:inline-block; padding:1px 8px; border-radius:10px; font-size:12px; color:#fff; background:var(--idle);; }
.badge.ok { background:var(--ok); } .badge.bad { background:var(--bad); } .badge.run { background:var(--run); }
.badge.warn { background:var(--warn); } .badge.off { background:var(--off); } .badge.idle { color:#24292f; }
pre { background:#f6f8fa; border:1px solid #eaeef2; padding:8px; overflow:auto; max-height:420px; font-size:12px; }
pre.log { background:#0d1117; color:#e6edf3; }
.note { color:#57606a; } .error { color:var(--bad); font-weight:600; white-space:pre-wrap; }
.flash { background:#ddf4ff; border:1px solid #54aeff; padding:8px 12px; border-radius:6px; margin-bottom:12px; }
.grid { display:flex; flex-wrap:wrap; gap:16px; align-items:flex-start; }
.grid > * { flex:0 1 auto; }
figure.plot { margin:0; background:#fff; }
figure.plot figcaption { font-size:12px; color:#57606a; }
.legend span { margin-right:12px; white-space:nowrap; }
.legend i { display:inline-block; width:10px; height:10px; margin-right:4px; }
svg text { font:11px system-ui,sans-serif; fill:#57606a; }
svg text.title { font-size:13px; fill:#1f2328; font-weight:600; }
svg text.axis { font-size:12px; } svg text.mark-label { fill:#d55e00; font-weight:600; }
svg.dag { display:block; margin:auto; max-width:100%; height:auto; }
svg.dag .node rect { fill:#fff; stroke:var(--idle); stroke-width:2; }
svg.dag .node text.name { font-size:13px; font-weight:600; fill:#1f2328; } svg.dag .node text.sub { font-size:11px; }
svg.dag .node.ok rect { fill:#dafbe1; stroke:var(--ok); } svg.dag .node.bad rect { fill:#ffebe9; stroke:var(--bad); }
svg.dag .node.run rect { fill:#ddf4ff; stroke:var(--run); animation:pulse 1.4s ease-in-out infinite; }
svg.dag .node.warn rect { fill:#fff8c5; stroke:var(--warn); }
svg.dag .node.off rect { fill:#f6f8fa; stroke:var(--off); stroke-dasharray:5 4; }
svg.dag .node.off text { fill:#8c959f; }
svg.dag .node.selected rect { stroke-width:4; }
svg.dag text.edge-label { font-weight:600; fill:#57606a; }
@keyframes pulse { 50% { stroke-width:4; } }
form.inline { display:inline; }
button {
  font:inherit; padding:5px 14px; border-radius:6px; border:1px solid #d0d7de; background:#f6f8fa; cursor:pointer;; }
button.primary { background:#1f883d; color:#fff; border-color:#1a7f37; }
button.danger { background:#cf222e; color:#fff; border-color:#a40e26; }
button:disabled { opacity:.45; cursor:default; }
textarea { width:100%; max-width:560px; font:inherit; padding:6px; }
.tryit { border:2px dashed #8c959f; border-radius:8px; padding:16px; background:#fff; max-width:640px; }
.tryit.over { border-color:#0969da; background:#ddf4ff; }
.tryit img.preview { max-width:160px; max-height:160px; display:block; margin:8px 0; }
.prediction { font-size:15px; } .prediction b { font-size:18px; }
.thumbs { display:flex; flex-wrap:wrap; gap:10px; } .thumbs figure { margin:0; width:120px; font-size:11px; }
.thumbs img { width:120px; height:120px; object-fit:cover; border:1px solid #d0d7de; }
iframe.report { width:100%; height:720px; border:1px solid #d0d7de; background:#fff; }
.actions { margin:8px 0 4px; display:flex; gap:8px; flex-wrap:wrap; align-items:center; }
.pager a { margin-right:10px; }
.badge, #executions td:nth-child(-n+5), #trials td:nth-child(3), #rules td:nth-child(-n+3) { white-space:nowrap; }
#executions td:nth-child(7) { font-size:12px; max-width:420px; }
.grid table { width:auto; min-width:280px; }
svg text.count { fill:#222; } svg text.count.light { fill:#fff; }
"""

JS = r"""
(function () {
  "use strict";
  const token = () => (document.querySelector('meta[name="ui-token"]') || {}).content || "";

  async function poll() {
    const body = document.body;
    const url = body.dataset.poll;
    if (!url) return;
    try {
      const answer = await fetch(url, {cache: "no-store"});
      if (answer.ok) {
        const state = await answer.json();
        if (state.signature !== body.dataset.signature) {
          const page = await fetch(location.href, {cache: "no-store"});
          const doc = new DOMParser().parseFromString(await page.text(), "text/html");
          const fresh = doc.getElementById("content");
          if (fresh) document.getElementById("content").innerHTML = fresh.innerHTML;
          body.dataset.signature = state.signature;
        }
        if (state.terminal) { delete body.dataset.poll; body.dataset.live = "done"; return; }
      }
    } catch (err) { console.warn("poll failed", err); }
    setTimeout(poll, 2000);
  }

  function sortTable(th) {
    const table = th.closest("table");
    const index = Array.from(th.parentNode.children).indexOf(th);
    const asc = !th.classList.contains("asc");
    table.querySelectorAll("th").forEach(h => h.classList.remove("asc", "desc"));
    th.classList.add(asc ? "asc" : "desc");
    const key = row => { const c = row.children[index]; return c ? (c.dataset.sort ?? c.textContent.trim()) : ""; };
    const rows = Array.from(table.tBodies[0].rows);
    rows.sort((a, b) => {
      const x = key(a), y = key(b), nx = parseFloat(x), ny = parseFloat(y);
      const both = !isNaN(nx) && !isNaN(ny) && isFinite(x) && isFinite(y);
      const order = both ? nx - ny : x.localeCompare(y);
      return asc ? order : -order;
    });
    rows.forEach(r => table.tBodies[0].appendChild(r));
  }

  function showPrediction(box, text, isError) {
    const out = box.querySelector(".prediction");
    out.textContent = "";
    out.classList.toggle("error", !!isError);
    if (isError) { out.textContent = text; return; }
    let value;
    try { value = JSON.parse(text); } catch (err) { out.textContent = text; return; }
    const top = Array.isArray(value) ? value[0] : value;
    const label = document.createElement("div");
    const name = top && (top.class_name ?? top.label ?? top.predicted_class);
    label.innerHTML = "Predicted class: <b></b>";
    label.querySelector("b").textContent = name === undefined ? "?" : String(name);
    if (top && typeof top.confidence === "number") label.append(" (confidence " + top.confidence.toFixed(3) + ")");
    out.appendChild(label);
    const raw = document.createElement("pre");
    raw.textContent = JSON.stringify(value, null, 2);
    out.appendChild(raw);
    box.dataset.predicted = name === undefined ? "" : String(name);
  }

  async function invoke(box, file) {
    const img = box.querySelector("img.preview");
    if (img) { img.src = URL.createObjectURL(file); img.hidden = false; }
    showPrediction(box, "invoking " + box.dataset.endpoint + " …", false);
    box.dataset.predicted = "";
    const answer = await fetch("/api/invoke?endpoint=" + encodeURIComponent(box.dataset.endpoint), {
      method: "POST", body: file,
      headers: {"Content-Type": file.type || "application/x-image", "X-UI-Token": token()}});
    const result = await answer.json();
    if (!answer.ok || result.error) {
      showPrediction(box, "HTTP " + (result.status || answer.status) + ": " + (result.error || result.body), true);
    } else {
      showPrediction(box, result.body, false);
    }
  }

  async function deployPoll(el) {
    try {
      const answer = await fetch(el.dataset.deployPoll, {cache: "no-store"});
      const state = await answer.json();
      el.querySelector(".text").textContent = state.text;
      el.dataset.state = state.state;
      if (state.done) return;
    } catch (err) { console.warn("deploy poll failed", err); }
    setTimeout(() => deployPoll(el), 1500);
  }

  document.addEventListener("click", ev => {
    const th = ev.target.closest("table.sortable th");
    if (th) sortTable(th);
  });
  document.addEventListener("change", ev => {
    const box = ev.target.closest(".tryit");
    if (box && ev.target.files && ev.target.files[0]) invoke(box, ev.target.files[0]);
  });
  document.addEventListener("dragover", ev => {
    const box = ev.target.closest(".tryit");
    if (box) { ev.preventDefault(); box.classList.add("over"); }
  });
  document.addEventListener("dragleave", ev => {
    const box = ev.target.closest(".tryit");
    if (box) box.classList.remove("over");
  });
  document.addEventListener("drop", ev => {
    const box = ev.target.closest(".tryit");
    if (!box) return;
    ev.preventDefault();
    box.classList.remove("over");
    if (ev.dataTransfer.files[0]) invoke(box, ev.dataTransfer.files[0]);
  });
  document.addEventListener("DOMContentLoaded", () => {
    if (document.body.dataset.poll) setTimeout(poll, 2000);
    document.querySelectorAll("[data-deploy-poll]").forEach(deployPoll);
  });
})();
"""
