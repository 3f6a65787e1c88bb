"""``kka eval``: detectors with and without KKA's anomalies on finished runs, as the paper's tables.

``runner`` fits each detector per variant, iteration and seed on a run directory
(kka_ray/rundir.py reads its rows; kka_ray/detectors/runner.py fits one detector), caching every
result; ``paper`` writes the main table and the KKA(k) ablation as Markdown, CSV and a PNG;
``cli`` is the command.
"""
