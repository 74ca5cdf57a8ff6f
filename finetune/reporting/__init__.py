"""What a user reads about runs: report.html, figures, runs/compare."""
