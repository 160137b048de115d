"""What the dashboard analyses: statistics over the cache table (statistics), live and offline clustering
(clustering, cluster_offline), the Clusters page's data layer (cluster_data), chart data (charts), image tiles
(overlay) and the offline HTML report (report). No streamlit here."""
