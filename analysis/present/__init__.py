"""Drawing for people, in one place: colour maps, overlays and image encoding (overlay), image tiles from a cache
(tiles), the altair charts of the dashboard and the report and their offline export (charts), and the Trust page's
charts (trust_charts). It computes nothing about the model: the analyses (analysis.explore, review, trust) compute
the numbers, and the dashboard and the HTML report (analysis/report.py) draw them through this package. It sits just
above analysis.pipeline (it reads a cache and places maps with the job's geometry) and below the analyses that draw
with it. No streamlit here."""
