"""Supervised warm start on gold-like or saved trajectories (`autorefine train-sft`; see `trainer`, `traces`)."""
