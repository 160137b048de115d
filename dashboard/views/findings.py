"""Findings: what the analysis found, in words, ranked (shortcuts first), for the people who decide.

Each finding: its sentences (every number links to the view that shows it), example tiles with their maps,
the verdict and what it rests on, a link to the page that shows it, and a tag button; the report built on them
as a download. The findings are the
stored ones (`python -m analysis findings`, run at the end of `explain` and `cluster`) when they are fresh;
otherwise they are computed now from what the cache holds, and the page says so.
"""
from __future__ import annotations

import streamlit as st

from analysis import report
from analysis.cache import Cache
from analysis.findings import Finding, current_findings, url
from analysis.findings.kinds import plural
from dashboard import common, tagging

VERDICT_COLOURS = {"shortcut": "red", "labels and outputs mismatched": "red", "undecided": "orange",
                   "observation": "blue", "your tag": "gray"}
TILES = 8


@st.cache_data(show_spinner="Reading the findings ...", max_entries=4)
def findings_of(_cache: Cache, key: str) -> tuple[list[dict], str]:
    """(findings as dicts, where they come from: "stored" or "computed now")."""
    findings, source = current_findings(_cache)
    return [f.as_dict() for f in findings], source


def show_finding(cache: Cache, number: int, finding: Finding) -> None:
    colour = VERDICT_COLOURS.get(finding.verdict, "gray")
    with st.container(border=True):
        st.markdown(f"#### {number}. {finding.title}  :{colour}-badge[{finding.verdict}]")
        st.markdown(finding.markdown())
        st.caption(f"Rests on: {finding.rests_on}. [Open the view]({url(finding.page, finding.query)}) · "
                   f"{len(finding.ids):,} images · strength {finding.strength:.2f}")
        if finding.examples:
            tiles = common.tiles_for(cache, finding.examples[:TILES], kind="overlay")
            names = cache.columns(["id", "label_name", "pred_name"]).set_index("id")
            for column, image_id, tile in zip(st.columns(TILES), finding.examples[:TILES], tiles):
                row = names.loc[image_id]
                column.image(tile, caption=common.image_caption(image_id, row["label_name"], row["pred_name"]),
                             width="stretch")
        if common.read_only():
            return
        with st.expander(f"Tag these {len(finding.ids):,} images"):
            tagging.tag_controls(cache, finding.ids, key=f"finding_{number}",
                                 default="shortcut" if finding.verdict == "shortcut" else None)


def main() -> None:
    cache = common.get_cache()
    st.title("Findings")
    records, source = findings_of(cache, common.cache_key(cache))
    findings = [Finding.from_dict(r) for r in records]
    if source != "stored":
        st.caption(f"Computed now from what the cache holds; `{common.analysis_command(cache, 'findings')}` "
                   "stores them (the explain and cluster commands do it at their end).")
    if not findings:
        st.info("Nothing to report: no shortcut was verified, no class is confused with another in more than "
                "5% of its images, and no class is decided off the object. This is not proof that the model is "
                f"fine: run the causal test (`{common.analysis_command(cache, 'cluster', '--verify-top', '3')}`) and "
                "look at the Trust page.")
        return
    st.markdown(f"**{len(findings)} {plural(len(findings), 'finding', 'findings')}**, shortcuts first, then by "
                "strength. Every number links to the view that shows it.")
    # The report built on these findings, for the people who decide (deferred: it draws tiles and charts).
    common.deferred_download("Download the report (HTML)",
                             lambda: report.build_report(cache, findings=findings).encode(), "fgcam_findings.html",
                             "text/html", "findings_report", icon=":material/description:",
                             help="One self-contained file: the summary, these findings with their evidence and "
                                  "tiles, the method's caveats, the clusters, per-class maps. As PDF: "
                                  f"`{common.analysis_command(cache, 'report', '--out', 'FILE.pdf')}`.")
    for number, finding in enumerate(findings, 1):
        show_finding(cache, number, finding)


if __name__ == "__main__":   # run as a page (st.navigation runs it as __main__); importable by tests
    main()
