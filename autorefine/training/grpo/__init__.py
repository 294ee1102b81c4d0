"""GRPO with multi-turn search rollouts on TRL's GRPOTrainer (`autorefine train-grpo`; see `trainer`)."""
