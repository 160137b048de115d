"""The report's compare section (`python -m analysis report --cache A --compare B`): the comparison of
analysis.findings.compare as self-contained HTML, with A's and B's maps of each finding's examples side by side.

Kept apart from analysis/report.py: `with_section` puts the section into a finished report document.
"""
from __future__ import annotations

import html
from typing import Any

import pandas as pd

from analysis.present import overlay
from analysis.present.tiles import image_tiles
from analysis.findings.compare import Comparison, FindingFate

TILE = 112
EXAMPLES = 4
CHANGED_ROWS = 50      # the changed predictions listed at most (the whole list: the Compare page's CSV)
_STYLE = ("<style>.pair{display:flex;gap:1.5em;flex-wrap:wrap}.pair>div{flex:0 0 auto}"
          ".pair figure{display:inline-block;margin:0 4px 4px 0;font-size:.8em}</style>")


def table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    """A plain HTML table (escaped), floats rounded."""
    return frame.round(digits).to_html(index=False, escape=True, border=0, na_rep="–")


def _figures(cache: Any, ids: list[int], tile: int) -> str:
    names = cache.columns(["id", "label_name", "pred_name"]).set_index("id")
    out = []
    for image_id, picture in zip(ids, image_tiles(cache, ids, "overlay", size=tile)):
        caption = f"#{image_id} {names.at[image_id, 'label_name']}→{names.at[image_id, 'pred_name']}"
        out.append(f'<figure style="width:{picture.shape[1]}px"><img src="{overlay.png_data_uri(picture)}" alt="image {image_id}" '
                   f'width="{picture.shape[1]}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    return "".join(out)


def fate_html(cache_a: Any, cache_b: Any, number: int, fate: FindingFate, tile: int = TILE,
              examples: int = EXAMPLES) -> str:
    """One finding of A: its sentences, what became of it in B, and A's and B's maps of a few of its images."""
    pairs = fate.examples[:examples]
    tiles = ""
    if pairs:
        tiles = (f'<div class="pair"><div><p class="meta">A · changed predictions first</p>{_figures(cache_a, [a for a, _ in pairs], tile)}</div>'
                 f'<div><p class="meta">B</p>{_figures(cache_b, [b for _, b in pairs], tile)}</div></div>')
    return (f'<div class="cluster"><h3>{number}. {html.escape(fate.finding.title)} <span class="meta">'
            f'[{html.escape(fate.finding.verdict)} → {html.escape(fate.verdict_b)}]</span></h3>'
            f'<p class="meta">In A: {html.escape(fate.finding.text())}</p><p>{html.escape(fate.text())}</p>'
            f'{tiles}</div>')


def compare_section(cache_a: Any, cache_b: Any, comparison: Comparison, tile: int = TILE,
                    examples: int = EXAMPLES) -> str:
    """The whole compare section: summary, per-class changes, each finding of A in B, the changed predictions
    (the first CHANGED_ROWS) and the findings new in B."""
    classes = comparison.classes[[c for c in comparison.classes.columns
                                  if c in ("class", "images") or c.startswith(("accuracy", "confidence"))]]
    fates = "".join(fate_html(cache_a, cache_b, n, fate, tile, examples)
                    for n, fate in enumerate(comparison.fates, 1)) or "<p>A has no finding.</p>"
    new = "".join(f"<li><strong>{html.escape(f.title)}</strong> [{html.escape(f.verdict)}]: "
                  f"{html.escape(f.text())}</li>" for f in comparison.new_in_b)
    changed = comparison.changed.head(CHANGED_ROWS)
    more = (f"<p class=\"meta\">… and {len(comparison.changed) - len(changed):,} more.</p>"
            if len(comparison.changed) > len(changed) else "")
    return (f'<section id="compare">{_STYLE}<h2>Compared with a second cache</h2>'
            f'<p class="meta">A: {html.escape(str(comparison.root_a))} · B: {html.escape(str(comparison.root_b))}; '
            'images matched by their path.</p>'
            + "".join(f"<p>{html.escape(line)}</p>" for line in comparison.summary())
            + f"<h3>Per class (true label; change = B − A)</h3>{table_html(classes)}"
            + f"<h3>The findings of A, in B</h3>{fates}"
            + f"<h3>Predictions that changed ({len(comparison.changed):,})</h3>"
            + (table_html(changed) if len(changed) else "<p>None.</p>") + more
            + "<h3>New in B</h3>" + (f"<ul>{new}</ul>" if new else "<p>No finding of B is new.</p>")
            + "</section>")


def with_section(document: str, section: str) -> str:
    """A finished HTML report with `section` added at the end of its body."""
    end = document.rfind("</body>")
    return document + section if end < 0 else document[:end] + section + document[end:]
