"""``kka eval``: detectors with and without KKA's anomalies on finished runs, as the paper's tables.

``inputs`` reads a run directory's normal and anomaly rows; ``runner`` fits each detector per
variant, iteration and seed (cached per result); ``tables`` writes Markdown, CSV and a PNG.
"""
