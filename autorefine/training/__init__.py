"""Training methods, one package each (`grpo`, `sft`, `ipdpo`), over the pieces they share: the search rollout
handed to TRL, rewards scored once per trajectory, held-out evaluation, checkpoints, health and the guard."""
