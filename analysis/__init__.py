"""The analysis of finished runs: results on disk (tidy rows, records, checksums), statistics, paired comparisons,
regression checks, sweep summaries and reports. It reads results/ only: it never imports torch or the model layers
and never runs a model (tests/test_layers.py keeps this true)."""
