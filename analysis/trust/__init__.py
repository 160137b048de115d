"""Can the explanations be trusted: faithfulness curves (faithfulness), method comparison and sanity checks
(compare, sanity), and the region tests that blur or paste an explanation's region (region_test,
insertion_test)."""
