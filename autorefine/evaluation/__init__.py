"""Scoring trajectories against gold answers, and evaluation runs over QA benchmarks."""
