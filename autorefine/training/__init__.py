"""Trainers: GRPO and SFT on TRL, their callbacks, and the gold traces of the SFT warm start."""
