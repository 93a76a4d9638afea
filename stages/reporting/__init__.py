"""The report stage's parts: loading and checking the results, statistics tables, figures, the document."""
