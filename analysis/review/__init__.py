"""From finding to fixing: tags on images (tags), "find more like these" (probe), likely label errors
(label_errors, with shortcut victims set apart: shortcut_victims; out-of-sample probabilities from a CSV:
probability_file) and the tagged list (export). The public names are re-exported here:

```python
from analysis.review import Review, label_issues
```
"""
from analysis.review.export import EXPORT_COLUMNS, tagged_table
from analysis.review.label_errors import label_issues, label_probabilities
from analysis.review.probability_file import ProbabilityFileError, read_probability_file
from analysis.review.shortcut_victims import VICTIM_COLUMNS, shortcut_victims, verifications_state
from analysis.review.tags import (ASIDE_PREFIX, DB_NAME, DEFAULT_LABEL_QUALITY_METHOD, DEFAULT_TAGS,
                                  LABEL_QUALITY_METHODS, MAX_NOTE_LENGTH, MAX_TAG_LENGTH, MAX_WHO_LENGTH, Review, ReviewError, clean_tag,
                                  keep_tags_aside)

__all__ = ["ASIDE_PREFIX", "DB_NAME", "DEFAULT_LABEL_QUALITY_METHOD", "DEFAULT_TAGS", "EXPORT_COLUMNS",
           "LABEL_QUALITY_METHODS", "MAX_NOTE_LENGTH",
           "MAX_TAG_LENGTH", "MAX_WHO_LENGTH", "ProbabilityFileError", "Review", "ReviewError", "VICTIM_COLUMNS",
           "clean_tag", "keep_tags_aside", "label_issues", "label_probabilities", "read_probability_file",
           "shortcut_victims", "tagged_table", "verifications_state"]
