"""Can the explanations be trusted: the methods compared (methods), their faithfulness comparison and sanity
checks (compare, sanity; the deletion and insertion curves are analysis.pipeline.faithfulness, which the job
stores too), what the Trust page shows (page), and the region tests that blur or paste an explanation's
region (region_removal: blur it; region_insertion: paste it), and the background swap that keeps the object and
changes what lies around it (background_swap)."""
