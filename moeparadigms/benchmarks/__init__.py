"""Data modules and environments for the paradigms' benchmarks (all offline)."""
