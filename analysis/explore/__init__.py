"""What the dashboard analyses: statistics over the cache table (statistics), the clustering engine (clustering)
with its two drivers -- every image of every scope, stored (cluster_offline), and a selection re-clustered on the
Clusters page (cluster_data) --, chart data (charts), image tiles (overlay) and the offline HTML report (report).
No streamlit here."""
