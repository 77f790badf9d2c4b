"""Reports: plots and model cards made from a run's report.json."""
