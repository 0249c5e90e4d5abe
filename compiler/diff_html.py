"""Renders a `planer diff` result as one self-contained HTML page.

Everything is inline (CSS, JS, SVG; no fonts, scripts or images fetched), so the page
opens offline and can be attached to a ticket. The page is rendered server-side from the
`--json` object; the script only adds interaction (click a layer to open its node list,
hide unchanged nodes) and records its own errors on `<body data-js-errors>`, which the
browser test reads.

    header ─ notes ─ side-by-side SVG (A layers | B layers, colour = change) ─ layer table
    with expandable node lists ─ nodes outside layers ─ op deltas ─ divergence ─ plan/report
"""

from __future__ import annotations

import html
import json
import math
from typing import Any

from planer.compiler.diff import format_delta

COLOURS = {"same": "#dcefdc", "changed": "#ffe1a6", "removed": "#f5c2c2", "added": "#c9dcff",
           "unmatched": "#e6e6e6"}

_CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1d232a}
h1{font-size:20px;margin:0 0 4px}h2{font-size:16px;margin:24px 0 8px}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ccd;padding:3px 8px;
text-align:right}th{background:#f1f3f6}td.l,th.l{text-align:left}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:6px 10px;margin:6px 0}
.ok{color:#17692a}.bad{color:#b3261e;font-weight:600}.mono{font-family:ui-monospace,monospace}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #99a}
details{margin:2px 0}summary{cursor:pointer}tr.same td{background:#fff}
tr.changed td{background:#fff4dc}tr.removed td{background:#fde8e8}tr.added td{background:#e8f0ff}
body.hide-same tr.same{display:none}g.layer{cursor:pointer}g.layer:hover rect{stroke-width:2}
pre{background:#f6f8fa;padding:8px;overflow:auto;max-height:320px}
.views{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
"""

_JS = """
(function(){
  var body=document.body;
  window.onerror=function(){body.dataset.jsErrors=String(Number(body.dataset.jsErrors)+1);};
  var data=JSON.parse(document.getElementById('diff-data').textContent);
  document.querySelectorAll('g.layer').forEach(function(g){
    g.addEventListener('click',function(){
      var d=document.getElementById('layer-'+g.dataset.row);
      if(d){d.open=true;d.scrollIntoView({block:'center'});}
    });
  });
  var hide=document.getElementById('hide-same');
  hide.addEventListener('change',function(){body.classList.toggle('hide-same',hide.checked);});
  document.getElementById('expand-all').addEventListener('click',function(){
    document.querySelectorAll('details.nodes').forEach(function(d){d.open=true;});
  });
  var n=data.totals.nodes;
  document.getElementById('js-summary').textContent=data.layers.length+' layer rows; '+
    n.changed+' changed, '+n.added+' added, '+n.removed+' removed nodes';
  body.dataset.ready='1';
})();
"""

STYLE, SCRIPT = _CSS, _JS  # for pages that embed the block view (see `embed`)


def render(data: dict[str, Any]) -> str:
    """Returns the page for a diff object (the `planer diff --json` object)."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        "<title>planer diff</title>",
        # No network: forbid anything but inline styles and scripts.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">",
        f"<style>{_CSS}</style></head>",
        "<body data-js-errors='0' data-ready='0'>",
        _header(data), _controls(),
        "<div class='views'>", _side_by_side(data), _totals(data), "</div>",
        _layers(data), _outside(data), _ops(data), _divergence(data.get("divergence")),
        _planer_files(data),
        f"<script type='application/json' id='diff-data'>{payload(data)}</script>",
        f"<script>{_JS}</script></body></html>",
    ]
    return "\n".join(parts)


def embed(data: dict[str, Any]) -> str:
    """Returns the block view of a diff for another planer page (the compile report).

    The host page must carry `STYLE` in its CSS, the diff object as
    `<script type='application/json' id='diff-data'>` and `SCRIPT` after the body.
    """
    return "\n".join([_controls(), "<p id='js-summary' class='mono'></p>",
                      "<div class='views'>", _side_by_side(data), _totals(data), "</div>",
                      _layers(data), _outside(data), _ops(data)])


def payload(data: dict[str, Any]) -> str:
    """Returns the diff object as JSON safe inside a `<script>` element."""
    return json.dumps(_finite(data), allow_nan=False).replace("</", "<\\/")


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _header(data: dict[str, Any]) -> str:
    a, b = data["a"], data["b"]
    rows = []
    for tag, side in (("A", a), ("B", b)):
        layers = "no Transformer layers found" if side["layers"] is None else \
            f"{side['layers']} {side['kind']} layers, hidden {side['hidden']}"
        origin = " (written by planer)" if side["planer"] else ""
        rows.append(f"<div><b>{tag}</b> <span class='mono'>{_e(side['path'])}</span>: "
                    f"{side['nodes']} nodes, {_e(layers)}{origin}</div>")
    notes = "".join(f"<div class='note'>{_e(n)}</div>" for n in data["notes"])
    if data["identical"]:
        notes += "<div class='note ok' id='identical'>No changes: every node pairs with an " \
                 "identical node.</div>"
    return (f"<h1>planer diff</h1>{''.join(rows)}{notes}"
            "<p id='js-summary' class='mono'></p>")


def _controls() -> str:
    legend = "".join(f"<span style='background:{c}'>{k}</span>" for k, c in COLOURS.items())
    return ("<p class='legend'>" + legend + "</p><p><label><input type='checkbox' "
            "id='hide-same'> hide unchanged nodes</label> <button id='expand-all' "
            "type='button'>expand all node lists</button></p>")


def _layer_colour(row: dict[str, Any], sub: str) -> str:
    if row["status"] == "unmatched":
        return COLOURS["removed"] if row["b"] is None else COLOURS["added"]
    key = "heads" if sub == "attn" else "ffn"
    touched = row[key][0] != row[key][1] or any(
        n["status"] != "same" and _sub_of(n) == sub for n in row["node_list"])
    return COLOURS["changed"] if touched else COLOURS["same"]


def _sub_of(node: dict[str, Any]) -> str:
    name = node.get("b") or node.get("a") or ""
    return "attn" if "/attn/" in name else "ffn" if "/ffn/" in name else ""


def _side_by_side(data: dict[str, Any]) -> str:
    """Draws A's layers left and B's right, one row per layer row, lines between pairs."""
    rows = data["layers"]
    if not rows:
        return ("<div id='side-by-side'><h2>Blocks</h2><p>No layers to show side by side "
                "(see the notes); the node lists below cover the whole graph.</p></div>")
    box_h, gap, top = 26, 12, 34
    width, height = 620, top + len(rows) * (box_h + gap) + 10
    out = [f"<div id='side-by-side'><h2>Blocks</h2><svg xmlns='http://www.w3.org/2000/svg' "
           f"width='{width}' height='{height}' role='img' aria-label='side-by-side blocks'>",
           "<text x='10' y='20' font-weight='600'>A</text>"
           f"<text x='{width - 240}' y='20' font-weight='600'>B</text>"]
    for i, row in enumerate(rows):
        y = top + i * (box_h + gap)
        out.append(f"<g class='layer' data-row='{i}' data-status='{row['status']}'>")
        for side, x0 in ((0, 10), (1, width - 240)):
            index = row["a"] if side == 0 else row["b"]
            if index is None:
                continue
            out.append(f"<text x='{x0}' y='{y + 17}' font-size='12'>layer {index}</text>")
            for k, sub in enumerate(("attn", "ffn")):
                x = x0 + 50 + k * 90
                label = (f"attn {row['heads'][side]}h" if sub == "attn"
                         else f"FFN {row['ffn'][side]}")
                out.append(f"<rect class='box {sub}' x='{x}' y='{y}' width='84' "
                           f"height='{box_h}' rx='4' fill='{_layer_colour(row, sub)}' "
                           f"stroke='#556'/><text x='{x + 6}' y='{y + 17}' "
                           f"font-size='12'>{_e(label)}</text>")
        if row["status"] == "paired":
            out.append(f"<line x1='236' y1='{y + box_h / 2}' x2='{width - 244}' "
                       f"y2='{y + box_h / 2}' stroke='#889' stroke-dasharray='4 3'/>")
        out.append("</g>")
    out.append("</svg></div>")
    return "".join(out)


def _totals(data: dict[str, Any]) -> str:
    t = data["totals"]
    flops = t["flops"]
    rows = [("parameters", *(f"{v:,}" for v in t["params"])),
            ("GFLOPs", *(("-" if v is None else f"{v / 1e9:.3f}") for v in flops)),
            ("nodes", *(str(v) for v in t["node_count"]))]
    body = "".join(f"<tr><td class='l'>{k}</td><td>{a}</td><td>{b}</td></tr>"
                   for k, a, b in rows)
    n = t["nodes"]
    counts = ", ".join(f"{k} {n[k]}" for k in ("same", "changed", "added", "removed"))
    return (f"<div id='totals'><h2>Totals</h2><table><tr><th></th><th>A</th><th>B</th></tr>"
            f"{body}</table><p>nodes: {counts}</p><p>FLOPs at batch {data['batch']}, "
            f"seq {data['seq_len']}.</p></div>")


def _node_table(nodes: list[dict[str, Any]]) -> str:
    rows = "".join(
        f"<tr class='{n['status']}'><td class='l'>{n['status']}</td><td class='l'>{_e(n['op'])}"
        f"</td><td class='l mono'>{_e(n['a'])}</td><td class='l mono'>{_e(n['b'])}</td>"
        f"<td class='l'>{_e(n['how'])}</td><td class='l'>{_e(n['why'])}</td></tr>"
        for n in nodes)
    return ("<table class='nodes'><tr><th class='l'>status</th><th class='l'>op</th>"
            "<th class='l'>A node</th><th class='l'>B node</th><th class='l'>paired by</th>"
            f"<th class='l'>what changed</th></tr>{rows}</table>")


def _layers(data: dict[str, Any]) -> str:
    if not data["layers"]:
        return ""
    head = ("<h2>Layers</h2><table id='layer-table'><tr><th>A</th><th>B</th><th>heads</th>"
            "<th>FFN</th><th class='l'>changes</th><th>params Δ</th><th>GFLOPs Δ</th>"
            "<th>+ / − / ~ nodes</th></tr>")
    rows, lists = [], []
    for i, r in enumerate(data["layers"]):
        n = r["nodes"]
        changes = ", ".join(r["changes"]) or ("unmatched" if r["status"] == "unmatched"
                                               else "unchanged")
        rows.append(
            f"<tr class='layer-row' data-status='{r['status']}'><td>{_e(r['a'])}</td>"
            f"<td>{_e(r['b'])}</td><td>{_pair(r['heads'])}</td><td>{_pair(r['ffn'])}</td>"
            f"<td class='l'>{_e(changes)}</td><td>{format_delta(r['params'])}</td>"
            f"<td>{format_delta(r['flops'], 1e9)}</td><td>+{n['added']} −{n['removed']} "
            f"~{n['changed']}</td></tr>")
        title = f"layer {_e(r['a'])} → {_e(r['b'])}: {len(r['node_list'])} nodes"
        passes = f" (passes: {_e(', '.join(r['passes']))})" if r["passes"] else ""
        lists.append(f"<details class='nodes' id='layer-{i}'><summary>{title}{passes}"
                     f"</summary>{_node_table(r['node_list'])}</details>")
    return head + "".join(rows) + "</table>" + "".join(lists)


def _outside(data: dict[str, Any]) -> str:
    group = data["outside"]
    n = group["nodes"]
    return (f"<h2>Outside the layers</h2><details class='nodes' id='outside'><summary>"
            f"{len(group['node_list'])} nodes: same {n['same']}, changed {n['changed']}, "
            f"added {n['added']}, removed {n['removed']}</summary>"
            f"{_node_table(group['node_list'])}</details>")


def _ops(data: dict[str, Any]) -> str:
    ops = data["totals"]["ops"]
    rows = "".join(f"<tr><td class='l'>{_e(op)}</td><td>{c['added']}</td><td>{c['removed']}"
                   f"</td><td>{c['changed']}</td></tr>" for op, c in ops.items())
    rows = rows or "<tr><td class='l'>(none)</td><td>0</td><td>0</td><td>0</td></tr>"
    return ("<h2>Nodes by op type</h2><table id='ops'><tr><th class='l'>op</th><th>added</th>"
            f"<th>removed</th><th>changed</th></tr>{rows}</table>")


def _divergence(div: dict[str, Any] | None) -> str:
    if div is None:
        return ("<h2>Divergence</h2><p id='divergence'>Not measured: pass --inputs or "
                "--calibration to run both models.</p>")
    first = div["first_divergent_node"]
    boundary = div["first_divergent_boundary"]
    lines = []
    if first:
        lines.append(f"<p class='bad' id='first-divergent'>First divergent node: "
                     f"<span class='mono'>{_e(first['name'])}</span> ({_e(first['op'])}; A: "
                     f"<span class='mono'>{_e(first['a'])}</span>), rel err "
                     f"{first['rel']:.2e}, cosine {first['cosine']:.6f}</p>")
    if boundary:
        lines.append(f"<p class='bad'>First divergent block boundary: "
                     f"<span class='mono'>{_e(boundary['name'])}</span></p>")
    if not first and not boundary:
        lines.append("<p class='ok' id='first-divergent'>No paired tensor diverges.</p>")
    rows = []
    for r in [*div["boundaries"], *div["outputs"]]:
        if "skipped" in r:
            rows.append(f"<tr><td class='l mono'>{_e(r['name'])}</td><td colspan='4'>"
                        f"{_e(r['skipped'])}</td></tr>")
            continue
        verdict = "<span class='bad'>diverged</span>" if r["diverged"] else \
            "<span class='ok'>ok</span>"
        rows.append(f"<tr><td class='l mono'>{_e(r['name'])}</td><td>{_num(r['max_abs'])}"
                    f"</td><td>{r['rel']:.2e}</td><td>{r['cosine']:.6f}</td><td>{verdict}"
                    "</td></tr>")
    table = ("<table id='divergence-table'><tr><th class='l'>tensor</th><th>max |Δ|</th>"
             f"<th>rel err</th><th>cosine</th><th></th></tr>{''.join(rows)}</table>")
    return (f"<h2>Divergence</h2><div id='divergence'><p>Inputs: {_e(div['inputs'])}; "
            f"tolerance {div['tolerance']:g} (relative L2 error, or 1 − cosine).</p>"
            f"{''.join(lines)}{_chart(div)}{table}</div>")


def _chart(div: dict[str, Any]) -> str:
    """Plots log10 relative error per block boundary, with the tolerance as a line."""
    points = [r for r in div["boundaries"] if "rel" in r]
    if not points:
        return ""
    width, height, pad = 620, 160, 30
    floor = -8.0

    def y(rel: float) -> float:
        level = max(floor, math.log10(rel)) if rel > 0 else floor
        return pad + (height - 2 * pad) * (level / floor)

    step = (width - 2 * pad) / max(1, len(points))
    bars = []
    for i, r in enumerate(points):
        top = y(r["rel"])
        colour = "#d9534f" if r["diverged"] else "#5cb85c"
        bars.append(f"<rect x='{pad + i * step + 1:.1f}' y='{top:.1f}' width='{step - 2:.1f}' "
                    f"height='{height - pad - top:.1f}' fill='{colour}'><title>"
                    f"{_e(r['name'])}: {r['rel']:.2e}</title></rect>")
    tol = y(div["tolerance"])
    return (f"<svg id='divergence-chart' xmlns='http://www.w3.org/2000/svg' width='{width}' "
            f"height='{height}' role='img' aria-label='relative error per block boundary'>"
            f"<text x='4' y='14' font-size='11'>log10 relative error per block boundary"
            f" (floor 1e-8)</text>{''.join(bars)}<line x1='{pad}' x2='{width - pad}' "
            f"y1='{tol:.1f}' y2='{tol:.1f}' stroke='#333' stroke-dasharray='5 3'/>"
            f"<text x='{width - pad - 80}' y='{tol - 3:.1f}' font-size='11'>tolerance</text>"
            "</svg>")


def _planer_files(data: dict[str, Any]) -> str:
    if not data.get("plan") and not data.get("report"):
        return ""
    parts = ["<h2>Plan and report (B was written by planer)</h2>"]
    for key in ("plan", "report"):
        if data.get(key) is not None:
            text = json.dumps(_finite(data[key]), indent=1)
            parts.append(f"<details id='planer-{key}'><summary>{key}.json</summary>"
                         f"<pre>{_e(text)}</pre></details>")
    return "".join(parts)


def _pair(pair: list[Any]) -> str:
    a, b = ("-" if v is None else str(v) for v in pair)
    return _e(a) if a == b else f"{_e(a)} → {_e(b)}"


def _num(value: float | str) -> str:
    return _e(value) if isinstance(value, str) else f"{value:.2e}"
