"""tc-diff --html: one self-contained page (no server, no network, no library).

Verdicts per endpoint, the differing exchanges with both responses side by side, and per
endpoint a chart of the latency distributions (empirical CDF of the time to the last
response byte, original and target) drawn as inline SVG by the code below.
"""

from __future__ import annotations

import html
import json

from tcpcopylib.diff.report import digest

MAX_LISTED = 200  # differing exchanges listed
OPEN = 10         # of which the first ones are shown open
W, H, PAD = 420, 220, 40
COLORS = {"original": "#1f6fb4", "target": "#e2711d"}

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:3px 8px}
th{background:#f3f3f3;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.same{color:#18794e} .different{color:#b42318;font-weight:600} .missing{color:#9a6700;font-weight:600}
.charts{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0;border:1px solid #ddd;padding:.4em}
figcaption{font-weight:600;font-size:.9em}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:.5em}
pre{background:#f7f7f7;border:1px solid #ddd;padding:.4em;margin:0;max-height:18em;overflow:auto;
white-space:pre-wrap;word-break:break-all;font-size:12px}
details{margin:.4em 0;border-left:3px solid #b42318;padding-left:.6em}
details.missing{border-color:#9a6700} .noise{color:#777}
#filter{width:24em;padding:3px}
"""

SCRIPT = """
(function(){
  var box=document.getElementById('filter');
  var items=document.querySelectorAll('[data-search]');
  box.addEventListener('input',function(){
    var q=box.value.toLowerCase();
    items.forEach(function(el){
      el.style.display=el.getAttribute('data-search').toLowerCase().indexOf(q)<0?'none':'';
    });
    document.getElementById('shown').textContent=
      Array.prototype.filter.call(items,function(el){return el.style.display!=='none';}).length;
  });
  document.getElementById('shown').textContent=items.length;
  document.body.setAttribute('data-ready','1');
})();
"""


def _e(v) -> str:
    return html.escape("" if v is None else str(v))


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.1f}"


def cdf_svg(title: str, series: dict) -> str:
    """An SVG step chart of the empirical CDFs of ``series`` ({name: sorted values, ms})."""
    values = [v for vs in series.values() for v in vs]
    if not values:
        return (f'<figure><figcaption>{_e(title)}</figcaption><p>no latency '
                f'measured</p></figure>')
    hi = max(values) * 1.05 or 1.0
    pw, ph = W - PAD - 10, H - PAD - 20

    def x(v):
        return PAD + pw * v / hi

    def y(p):
        return 10 + ph * (1 - p)
    parts = [f'<svg width="{W}" height="{H}" '
             f'viewBox="0 0 {W} {H}" role="img" aria-label="{_e(title)}">',
             f'<rect x="{PAD}" y="10" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>']
    for i in range(6):  # grid and ticks
        v = hi * i / 5
        parts.append(f'<line x1="{x(v):.1f}" y1="10" x2="{x(v):.1f}" y2="{10 + ph}" '
                     f'stroke="#eee"/><text x="{x(v):.1f}" y="{H - 22}" font-size="10" '
                     f'text-anchor="middle">{v:.0f}</text>')
        p = i / 5
        parts.append(f'<text x="{PAD - 4}" y="{y(p) + 3:.1f}" font-size="10" '
                     f'text-anchor="end">{p:.1f}</text>')
    parts.append(f'<text x="{PAD + pw / 2}" y="{H - 6}" font-size="11" text-anchor="middle">'
                 f'ms to the last response byte</text>')
    for k, (name, vs) in enumerate(series.items()):
        if not vs:
            continue
        n = len(vs)
        pts = [f"{x(0):.1f},{y(0):.1f}"]
        for i, v in enumerate(vs):
            pts.append(f"{x(v):.1f},{y(i / n):.1f}")
            pts.append(f"{x(v):.1f},{y((i + 1) / n):.1f}")
        color = COLORS.get(name, "#555")
        parts.append(f'<polyline class="cdf-{_e(name)}" fill="none" stroke="{color}" '
                     f'stroke-width="2" points="{" ".join(pts)}"/>')
        parts.append(f'<rect x="{PAD + 10}" y="{18 + 16 * k}" width="12" height="4" '
                     f'fill="{color}"/><text x="{PAD + 26}" y="{23 + 16 * k}" '
                     f'font-size="11">{_e(name)} (n={n})</text>')
    parts.append("</svg>")
    return f'<figure><figcaption>{_e(title)}</figcaption>{"".join(parts)}</figure>'


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def render(results, differ, dig: dict | None = None) -> str:
    """The page, of ``results`` or of a digest ``dig`` (tcpcopylib.diff.report.digest)."""
    dig = dig or digest(results)
    t, eps = dig["totals"], dig["endpoints"]
    out = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width,initial-scale=1">',
           f"<title>tc-diff: {t['different']} different, {t['missing']} missing of "
           f"{t['exchanges']}</title><style>{CSS}</style></head><body>",
           "<h1>tc-diff report</h1>",
           f"<p id=\"totals\">{t['exchanges']} exchanges on {differ.connections} connections: "
           f"<span class=same>{t['same']} same</span>, <span class=different>"
           f"{t['different']} different</span>, <span class=missing>{t['missing']} "
           f"missing</span>.</p>"]
    if t["noise_fields"]:
        out.append(f"<p class=noise>Noise, left out of the verdicts: "
                   f"{_e(', '.join(t['noise_fields']))}</p>")
    out.append("<h2>Endpoints</h2><table id=endpoints><tr><th>endpoint</th><th>exchanges</th>"
               "<th>same</th><th>different</th><th>missing</th><th>original p50/p90/p99 ms"
               "</th><th>target p50/p90/p99 ms</th><th>shift of p50</th></tr>")
    for ep, st in eps.items():
        o, g = st["original"]["last"], st["target"]["last"]
        out.append(f"<tr><td>{_e(ep)}</td><td class=n>{st['n']}</td><td class=n>{st['same']}"
                   f"</td><td class='n{' different' if st['different'] else ''}'>"
                   f"{st['different']}</td><td class='n{' missing' if st['missing'] else ''}'>"
                   f"{st['missing']}</td><td class=n>{_fmt(o['p50'])} / {_fmt(o['p90'])} / "
                   f"{_fmt(o['p99'])}</td><td class=n>{_fmt(g['p50'])} / {_fmt(g['p90'])} / "
                   f"{_fmt(g['p99'])}</td><td class=n>{_fmt(st['shift_ms'])}</td></tr>")
    out.append("</table><h2>Latency</h2><div class=charts>")
    for ep, st in eps.items():
        out.append(cdf_svg(ep, st["cdf"]))
    out.append("</div>")
    bad, n_bad = dig["bad"], dig["bad_total"]
    shown = len(bad[:MAX_LISTED])
    out.append(f"<h2>Differences</h2><p><input id=filter placeholder='filter: endpoint, "
               f"client, field…'> <span id=shown>{shown}</span> shown"
               f"{f' (the first {shown} of {n_bad})' if n_bad > shown else ''}</p>")
    for k, r in enumerate(bad[:MAX_LISTED]):
        real = [d for d in r.diffs if not d.noise]
        search = " ".join([r.endpoint, r.client, r.request, r.verdict,
                           *(d.field for d in real)])
        out.append(f"<details{' open' if k < OPEN else ''} class='{r.verdict}' data-search=\"{_e(search)}\"><summary>"
                   f"<span class={r.verdict}>{r.verdict}</span> {_e(r.client)} #{r.index} "
                   f"<code>{_e(r.request)}</code> — {_e(', '.join(d.field for d in real)) or _e('session ' + str(r.outcome))}"
                   f"</summary>")
        if real:
            out.append("<table><tr><th>field</th><th>original</th><th>target</th></tr>")
            for d in real:
                out.append(f"<tr><td>{_e(d.field)}</td><td><code>{_e(d.a)}</code></td>"
                           f"<td><code>{_e(d.b)}</code></td></tr>")
            out.append("</table>")
        out.append(f"<div class=pair><pre>{_e(_text(r.orig_text))}</pre>"
                   f"<pre>{_e(_text(r.target_text)) or '(no response)'}</pre></div></details>")
    data = json.dumps({"totals": t}).replace("</", "<\\/")
    out.append(f'<script type="application/json" id="data">{data}</script>')
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(out)


def write_html(path: str, results, differ, dig: dict | None = None) -> None:
    from tcpcopylib.errors import NoInputError

    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(render(results, differ, dig))
    except OSError as e:
        raise NoInputError(f"--html {path}: {e.strerror or e}") from None
