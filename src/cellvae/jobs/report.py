"""A self-contained HTML report: data summary, settings, training curves, embeddings and metrics.

Figures are embedded as base64 PNG so the file stands alone.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

__all__ = ["render_report", "html_table", "html_figure"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:0.5em 0} td,th{border:1px solid #ddd;padding:3px 10px;text-align:left}
th{background:#f4f4f4} .figs img{max-width:100%;margin:0.5em 0;border:1px solid #eee}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em} .muted{color:#777;font-size:0.9em}
"""


def _table(rows: dict) -> str:
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>" for k, v in rows.items()
    )
    return f"<table>{body}</table>"


def html_table(header: list[str], rows: list[list]) -> str:
    """An HTML table with a header row (values formatted as in the report's tables, escaped)."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt(x) for x in v) if len(v) <= 12 else f"{len(v)} items"
    return str(v)


def html_figure(path: str | Path, caption: str) -> str:
    """A PNG file embedded as a base64 ``<figure>`` with its caption (for :func:`render_report`'s sections)."""
    return _img(Path(path), caption)


def _img(path: Path, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}"/>'
            f"<figcaption class=muted>{html.escape(caption)}</figcaption></figure>")


def render_report(
    title: str,
    data_summary: dict,
    settings: dict,
    training: dict,
    metrics: dict,
    figures: list[tuple[Path, str]],
    notes: list[str] | None = None,
    markers: dict[str, list[str]] | None = None,
    sections: list[tuple[str, str]] | None = None,
    figures_heading: str = "Latent space",
) -> str:
    """Return the report as an HTML string.

    Args:
        title: page title (e.g. the input file name).
        data_summary, settings, training, metrics: flat dicts shown as two-column tables.
        figures: (PNG path, caption) pairs; the first is shown full width (training curves), the rest in a grid.
        notes: free-text lines shown at the end.
        markers: label -> top up-regulated genes (Bayes-factor DE, label vs the rest), shown as a table.
        sections: further (heading, HTML) sections shown after the metrics (e.g. :func:`html_table` output).
        figures_heading: heading of the figures after the first (no heading when there are none).
    """
    figs = [_img(p, c) for p, c in figures if Path(p).exists()]
    first, rest = (figs[0], figs[1:]) if figs else ("", [])
    marker_rows = "".join(f"<tr><td>{html.escape(g)}</td><td>{html.escape(', '.join(genes))}</td></tr>"
                          for g, genes in (markers or {}).items())
    marker_html = (
        "<h2>Marker genes</h2><p class=muted>Bayes-factor differential expression of each label against the "
        "rest (Lopez et al. 2018), genes higher in the label, by Bayes factor; all statistics in markers.csv."
        f"</p><table><tr><th>label</th><th>top genes</th></tr>{marker_rows}</table>" if marker_rows else ""
    )
    notes_html = "".join(f"<li>{html.escape(n)}</li>" for n in (notes or []))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>cellvae report: {html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>cellvae report</h1><p class=muted>{html.escape(title)}</p>
<h2>Data</h2>{_table(data_summary)}
<h2>Settings</h2>{_table(settings)}
<h2>Training</h2>{_table(training)}<div class=figs>{first}</div>
<h2>Metrics</h2>{_table(metrics)}
{''.join(f'<h2>{html.escape(h)}</h2>{body}' for h, body in (sections or []))}
{f'<h2>{html.escape(figures_heading)}</h2><div class="figs grid">' + ''.join(rest) + '</div>' if rest else ''}
{marker_html}
{f'<h2>Notes</h2><ul>{notes_html}</ul>' if notes_html else ''}
</body></html>
"""
