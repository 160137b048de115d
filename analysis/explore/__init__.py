"""What the dashboard analyses: statistics over the cache table (statistics), the clustering engine (clustering)
with its two drivers -- every image of every scope, stored (cluster_offline), and a selection re-clustered on the
Clusters page (cluster_data) --, what the Clusters page shows of a stored clustering (cluster_display), concepts
(concepts) and full-resolution maps (full_maps). Numbers only: drawing is analysis.present, the HTML report
analysis/report.py. No streamlit here."""
