"""Self-contained HTML reports (data quality, evaluation, run summary); shared helpers in reports.html."""
