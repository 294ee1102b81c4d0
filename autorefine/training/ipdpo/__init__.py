"""IP-DPO, TeaRAG's iterative process-aware DPO (`autorefine train-ipdpo`): rounds of sampling, scoring,
pairing, masked DPO and held-out evaluation (see `rounds`)."""
