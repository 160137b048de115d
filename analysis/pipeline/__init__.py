"""The offline job as a library: reading a labelled dataset (datasets), loading a model and its preprocessing
(models), where a map lies on the image (geometry), the per-image scores and descriptors (scores), the
deletion and insertion curves (faithfulness), and the job that explains a dataset into the cache (job). The
command line is analysis/commands/explain.py; from Python: `job.explain_dataset(plan.ExplainOptions(...))`."""
