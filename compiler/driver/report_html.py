"""Renders a compile's report.json as one self-contained page, OUT/report.html.

Everything is inline (CSS, SVG, the diff page's small script; nothing fetched), so the
page opens offline and can be attached to a ticket:

    header: original ─▶ compiled, parameters, FLOPs, compile time, calibration
    latency: target / measured / predicted / dense, and (latency targets) a plot of every
             round, measured ms against held-out pooled cosine, target as a dashed line
    plan per layer: heads and FFN before → after, refit errors, skim and MoE entries
    search (latency targets): per layer the variant chosen and its neighbours on the
             layer's front (predicted ms, predicted loss), the losses measured for it,
             the interaction weights and the whole plans they were fitted on
    fidelity: held-out cosines (mean, 5th percentile), outputs on random inputs
    blocks: the `planer diff --html` block view of original against compiled
    report.json itself, folded
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from planer.compiler import diff_html
from planer.compiler.errors import PlanerError

_CSS = """
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:8px 0}
.card{border:1px solid #ccd;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:18px}.met{color:#17692a}.missed{color:#b3261e}
svg text{font-family:system-ui,sans-serif}
"""
PLOT_W, PLOT_H, PAD = 620, 300, 48


def render_report_html(report: dict[str, Any], original: Path, compiled: Path) -> str:
    """Returns the report page for `report` (report.json) of `original` compiled to `compiled`.

    The block diff reads both models; where planer cannot diff them, the page says why.
    """
    diff, diff_note = _diff(original, compiled, report)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        "<title>planer compile report</title>",
        # No network: forbid anything but inline styles and scripts.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'; img-src data:\">",
        f"<style>{diff_html.STYLE}{_CSS}</style></head>",
        "<body data-js-errors='0' data-ready='0'>",
        _header(report, original, compiled), _latency(report), _plan(report),
        _search(report), _fidelity(report), "<h2 id='blocks'>Blocks: original → compiled</h2>",
    ]
    if diff is not None:
        parts += [diff_html.embed(diff),
                  f"<script type='application/json' id='diff-data'>{diff_html.payload(diff)}"
                  "</script>"]
    else:
        parts.append(f"<p class='note' id='diff-unavailable'>{_e(diff_note)}</p>")
    text = json.dumps(report, indent=1, default=str)
    parts.append(f"<details id='report-json'><summary>report.json</summary><pre>{_e(text)}"
                 "</pre></details>")
    # The diff page's script wires the block view; without one, only the ready flag is set.
    script = diff_html.SCRIPT if diff is not None else \
        "document.body.dataset.ready='1';"
    parts.append(f"<script>{script}</script></body></html>")
    return "\n".join(parts)


def _diff(original: Path, compiled: Path,
          report: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    from planer.compiler.diff import diff_models

    try:
        result = diff_models(original, compiled, batch=int(report.get("batch", 1)),
                             seq_len=int(report.get("seq_len", 128)))
    except PlanerError as exc:
        return None, f"The block view is not available: {exc}"
    return result.to_dict(), ""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _card(label: str, value: str, element_id: str, css: str = "") -> str:
    return (f"<div class='card' id='{element_id}'>{_e(label)}<b class='{css}'>{_e(value)}</b>"
            "</div>")


def _header(report: dict[str, Any], original: Path, compiled: Path) -> str:
    calib = report.get("calibration") or {}
    source = calib.get("source", "none (random inputs)")
    if calib.get("synthetic"):
        source += " (synthetic)"
    cards = [
        _card("parameters", f"{report['params_before']:,} → {report['params_after']:,}",
              "card-params"),
        _card("FLOPs kept", f"{report['flops_ratio']:.3f}", "card-flops"),
        _card("compile", f"{report.get('compile_seconds', math.nan):.1f} s", "card-seconds"),
    ]
    return (f"<h1>planer compile report</h1><div><b>original</b> <span class='mono'>"
            f"{_e(original)}</span></div><div><b>compiled</b> <span class='mono'>"
            f"{_e(compiled)}</span></div><p>batch {_e(report.get('batch'))}, sequence "
            f"{_e(report.get('seq_len'))}; selection {_e(report.get('selection'))}; "
            f"calibration {_e(source)}</p><div class='cards'>{''.join(cards)}</div>")


def _latency(report: dict[str, Any]) -> str:
    if "target_ms" not in report:
        return ("<h2>Latency</h2><p id='latency'>No latency target was given (--plan or "
                "--target-flops): nothing was timed against a target.</p>")
    met = bool(report["target_met"])
    cards = [
        _card("target", f"{report['target_ms']:.2f} ms", "card-target"),
        _card("measured", f"{report['measured_ms']:.2f} ms", "card-measured",
              "met" if met else "missed"),
        _card("predicted", f"{report['predicted_ms']:.2f} ms", "card-predicted"),
        _card("dense", f"{report['baseline_ms']:.2f} ms", "card-dense"),
        _card("speed-up", f"{report['speedup']:.2f}×", "card-speedup"),
    ]
    verdict = ("<p class='ok' id='verdict'>Target met.</p>" if met else
               "<p class='bad' id='verdict'>Target missed: the fastest model found was "
               "written as fastest-missed-target.onnx.</p>")
    return (f"<h2>Latency</h2><div id='latency'><div class='cards'>{''.join(cards)}</div>"
            f"{verdict}{_rounds_table(report)}{_plot(report)}</div>")


def _rounds_table(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{i + 1}</td><td>{r['budget_ms']:.2f}</td><td>{r['predicted_ms']:.2f}</td>"
        f"<td>{r['measured_ms']:.2f}</td><td>{_num(r.get('pooled_cosine'), '.4f')}</td>"
        f"<td>{_num(r.get('predicted_loss'), '.4f')}</td></tr>"
        for i, r in enumerate(report.get("rounds", [])))
    return ("<table id='rounds'><tr><th>round</th><th>budget ms</th><th>predicted ms</th>"
            "<th>measured ms</th><th>pooled cosine</th><th>predicted loss</th></tr>"
            f"{rows}</table>")


def _num(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _plot(report: dict[str, Any]) -> str:
    """Plots each round's measured latency against its held-out pooled cosine."""
    rounds = [r for r in report.get("rounds", []) if r.get("pooled_cosine") is not None]
    if not rounds:
        return ("<p id='plot-missing'>No round has a held-out fidelity figure to plot "
                "(calibration was synthetic).</p>")
    dense = report["baseline_ms"]
    xs = [r["measured_ms"] for r in rounds] + [report["target_ms"], dense]
    ys = [r["pooled_cosine"] for r in rounds] + [1.0]
    x0, x1 = 0.0, max(xs) * 1.08
    y0, y1 = max(0.0, min(ys) - 0.05), 1.0

    def px(ms: float) -> float:
        return PAD + (PLOT_W - 2 * PAD) * (ms - x0) / (x1 - x0)

    def py(cos: float) -> float:
        return PLOT_H - PAD - (PLOT_H - 2 * PAD) * (cos - y0) / max(y1 - y0, 1e-9)

    out = [f"<svg id='tradeoff' xmlns='http://www.w3.org/2000/svg' width='{PLOT_W}' "
           f"height='{PLOT_H}' role='img' aria-label='latency against quality per round'>",
           f"<text x='{PAD}' y='16' font-size='12' font-weight='600'>latency vs quality, one "
           "point per round</text>", _axes(x0, x1, y0, y1, px, py)]
    tx = px(report["target_ms"])
    out.append(f"<line id='target-line' x1='{tx:.1f}' x2='{tx:.1f}' y1='{PAD - 10}' "
               f"y2='{PLOT_H - PAD}' stroke='#b3261e' stroke-dasharray='5 3'/><text "
               f"x='{tx + 4:.1f}' y='{PAD - 2}' font-size='11' fill='#b3261e'>target "
               f"{_ms(report['target_ms'])} ms</text>")
    out.append(f"<circle class='dense' cx='{px(dense):.1f}' cy='{py(1.0):.1f}' r='5' "
               f"fill='#888'><title>dense {dense:.2f} ms, cosine 1</title></circle><text "
               f"x='{px(dense) + 7:.1f}' y='{py(1.0) + 14:.1f}' font-size='11' "
               "fill='#555'>dense</text>")
    for i, r in enumerate(rounds):
        chosen = r["measured_ms"] == report["measured_ms"]
        cx, cy = px(r["measured_ms"]), py(r["pooled_cosine"])
        ring = (f"<circle cx='{cx:.1f}' cy='{cy:.1f}' r='9' fill='none' stroke='#17692a' "
                "stroke-width='2'/>" if chosen else "")
        out.append(f"<g class='round{' chosen' if chosen else ''}'>{ring}<circle cx='{cx:.1f}' "
                   f"cy='{cy:.1f}' r='5' fill='#2f6db3'><title>round {i + 1}: "
                   f"{r['measured_ms']:.2f} ms, pooled cosine {r['pooled_cosine']:.4f}"
                   f"</title></circle><text x='{cx + 7:.1f}' y='{cy - 7:.1f}' "
                   f"font-size='11'>{i + 1}</text></g>")
    out.append("</svg>")
    return "".join(out)


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _axes(x0: float, x1: float, y0: float, y1: float, px: Any, py: Any) -> str:
    """Draws both axes with five ticks each and their labels."""
    bottom, parts = PLOT_H - PAD, []
    parts.append(f"<line x1='{PAD}' x2='{PLOT_W - PAD}' y1='{bottom}' y2='{bottom}' "
                 f"stroke='#333'/><line x1='{PAD}' x2='{PAD}' y1='{PAD - 10}' y2='{bottom}' "
                 "stroke='#333'/>")
    for k in range(5):
        ms, cos = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
        parts.append(f"<text x='{px(ms):.1f}' y='{bottom + 16}' font-size='11' "
                     f"text-anchor='middle'>{ms:.1f}</text><text x='{PAD - 6}' "
                     f"y='{py(cos) + 4:.1f}' font-size='11' text-anchor='end'>{cos:.2f}</text>")
    parts.append(f"<text x='{PLOT_W / 2:.0f}' y='{PLOT_H - 8}' font-size='12' "
                 "text-anchor='middle'>measured latency (ms)</text><text x='12' "
                 f"y='{PLOT_H / 2:.0f}' font-size='12' transform='rotate(-90 12 "
                 f"{PLOT_H / 2:.0f})' text-anchor='middle'>held-out pooled cosine</text>")
    return "".join(parts)


def _plan(report: dict[str, Any]) -> str:
    layers = report["layers"]
    skim = any("skim_keep" in la for la in layers)
    moe = any("moe" in la for la in layers)
    head = ("<h2>Plan per layer</h2><table id='plan'><tr><th>layer</th><th>heads</th>"
            "<th>FFN</th><th>attention error (sliced → refit)</th><th>FFN error (sliced → "
            "refit)</th>" + ("<th>skim keep</th>" if skim else "")
            + ("<th class='l'>MoE</th>" if moe else "") + "<th class='l'>heads kept</th></tr>")
    rows = []
    for la in layers:
        h, f = la["heads"], la["ffn"]
        cells = [str(la["index"]), _arrow(h), _arrow(f), _err(la.get("attn")),
                 _err(la.get("ffn_fit"))]
        if skim:
            cells.append(_num(la.get("skim_keep"), ".2f"))
        if moe:
            cells.append(_e(json.dumps(la["moe"]) if la.get("moe") else ""))
        kept = h.get("kept")
        cells.append(_e(", ".join(map(str, kept)) if kept is not None else "all"))
        changed = h["before"] != h["after"] or f["before"] != f["after"]
        rows.append(f"<tr class='{'changed' if changed else 'same'}'>"
                    + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return head + "".join(rows) + "</table>"


def _search(report: dict[str, Any]) -> str:
    search = report.get("search")
    if not search:
        return ""
    weights = ", ".join(f"{k} {v:.3g}" for k, v in search.get("weights", {}).items())
    rows = []
    for la in search["layers"]:
        options = [(la["chosen"], True)] + [(v, False) for v in la["alternatives"]]
        options.sort(key=lambda item: item[0]["predicted_ms"])
        for k, (v, chosen) in enumerate(options):
            first = k == 0
            cells = [str(la["index"]) if first else "", _variant_text(v["variant"]),
                     f"{v['predicted_ms']:.3f}", f"{v['predicted_loss']:.5f}",
                     _e(_measured_text(la["measured"])) if first else ""]
            rows.append(f"<tr class='{'changed' if chosen else 'same'}'>"
                        + "".join(f"<td class='l'>{c}</td>" for c in cells) + "</tr>")
    fits = "".join(f"<li>measured {c['measured_loss']:.5f}, predicted "
                   f"{c['predicted_loss']:.5f}</li>" for c in search.get("corrections", []))
    return ("<h2>Search</h2><div id='search'><p>Kinds: "
            f"{_e(', '.join(search.get('kinds', [])))}; skim point "
            f"{_e(search.get('skim_placement') or 'none')}; interaction weights {_e(weights)}. "
            f"Recovery: {_e(search.get('recovery'))}.</p>"
            "<table id='search-layers'><tr><th class='l'>layer</th><th class='l'>variant "
            "(chosen highlighted)</th><th class='l'>predicted ms</th><th class='l'>predicted "
            "loss</th><th class='l'>measured single-change loss</th></tr>"
            f"{''.join(rows)}</table><p>Whole plans the weights were fitted on:</p>"
            f"<ul id='search-corrections'>{fits}</ul></div>")


def _variant_text(variant: dict[str, Any]) -> str:
    text = f"{variant['heads']} heads, FFN {variant['ffn']}"
    if variant.get("moe"):
        moe = variant["moe"]
        text += f", MoE {moe['experts']} experts top-{moe.get('top_k', moe.get('tau'))}"
    if variant.get("int8"):
        text += f", INT8 {variant['int8']['blocks']}"
    if variant.get("skim_keep") is not None:
        text += f", skim keep {variant['skim_keep']}"
    return _e(text)


def _measured_text(measured: dict[str, Any]) -> str:
    parts = [f"heads {measured['heads']}", f"FFN {measured['ffn']}"]
    parts += [f"{k} {measured[k]}" for k in ("int8_attn", "int8_ffn", "skim") if k in measured]
    if measured.get("moe"):
        parts.append(f"MoE {measured['moe']}")
    return "; ".join(parts)


def _arrow(pair: dict[str, Any]) -> str:
    before, after = pair["before"], pair["after"]
    return _e(before) if before == after else f"{_e(before)} → {_e(after)}"


def _err(record: dict[str, Any] | None) -> str:
    if not record:
        return "-"
    refit = record.get("error_refit")
    sliced = record["error_sliced"]
    return f"{sliced:.3f} → {refit:.3f}" if refit is not None else f"{sliced:.3f}"


def _fidelity(report: dict[str, Any]) -> str:
    fid = report.get("fidelity") or {}
    rows = [f"<tr><td class='l'>{_e(key.replace('_', ' '))}</td><td>{val['mean']:.4f}</td>"
            f"<td>{val['p5']:.4f}</td></tr>"
            for key, val in fid.items() if isinstance(val, dict)]
    table = ("<table id='fidelity-table'><tr><th class='l'>held-out "
             f"({_e(fid.get('holdout_samples'))} samples)</th><th>mean</th><th>5th "
             f"percentile</th></tr>{''.join(rows)}</table>" if rows else
             "<p>No held-out fidelity: compiled without calibration data.</p>")
    check = report.get("verification") or {}
    verify = (f"<p id='verification'>Outputs against the original on {_e(check.get('inputs'))} "
              f"inputs: max |Δ| {check.get('max_abs_diff', math.nan):.2e}, lowest cosine "
              f"{check.get('min_cosine', math.nan):.4f}.</p>" if check else "")
    return f"<h2>Fidelity</h2><div id='fidelity'>{table}{verify}</div>"
