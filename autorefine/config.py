"""Run configs: what each training command reads, composed of the settings sections beside their code.

`load_config(GRPORunConfig, "configs/grpo/tiny-cpu.yaml", ["trainer.max_steps=5"])` (`autorefine.settings`)
builds one from a YAML preset and overrides, checking every name and type before anything loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autorefine.data import DataSettings
from autorefine.modeling import LoraSettings, ModelSettings
from autorefine.retrieval import RetrieverSettings
from autorefine.rollout.agent import RolloutSettings
from autorefine.scoring.reward import RewardSettings
from autorefine.training.callbacks import HeldoutSettings
from autorefine.training.grpo.samples import LoggingSettings
from autorefine.training.guard import GuardSettings
from autorefine.training.ipdpo.heldout import RoundHeldoutSettings
from autorefine.training.ipdpo.pairs import PairSettings
from autorefine.training.ipdpo.report import IPDPOLoggingSettings
from autorefine.training.ipdpo.sampling import SamplingSettings


@dataclass(frozen=True)
class RunConfig:
    """Sections every training run has."""

    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataSettings = field(default_factory=DataSettings)
    heldout: HeldoutSettings = field(default_factory=HeldoutSettings)
    retriever: RetrieverSettings = field(default_factory=RetrieverSettings)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    template: str | None = None  # prompt template file (None: the packaged AutoRefine-style template)
    trainer: dict[str, Any] = field(default_factory=dict)  # trl.GRPOConfig / trl.SFTConfig arguments


@dataclass(frozen=True)
class GRPORunConfig(RunConfig):
    """Everything `autorefine train-grpo` needs."""

    reward: RewardSettings = field(default_factory=RewardSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    guard: GuardSettings = field(default_factory=GuardSettings)
    # Groups whose rewards are all equal leave the loss (see training/grpo/flat_groups.py).
    drop_flat_groups: bool = False
    eval_temperature: float = 0.0  # validation decoding (0: greedy)


@dataclass(frozen=True)
class SFTRunConfig(RunConfig):
    """Everything `autorefine train-sft` needs."""

    traces_file: str | None = None  # saved trajectories to imitate; None: build gold-like traces from data
    require_evidence: bool = True  # gold traces only where the retrieved documents contain the answer
    tiny_model: dict[str, int] | None = None  # build a fresh tiny Qwen2 of this shape instead of loading one

    def __post_init__(self) -> None:
        _grpo_only_filter(self, "train-sft")


@dataclass(frozen=True)
class IPDPORunConfig(RunConfig):
    """Everything `autorefine train-ipdpo` needs; `trainer` holds trl.DPOConfig arguments."""

    heldout: RoundHeldoutSettings = field(default_factory=RoundHeldoutSettings)
    rounds: int = 3
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)  # the outcome metric of the scores
    pairs: PairSettings = field(default_factory=PairSettings)
    nll_weight: float = 1.0  # weight of the NLL ("sft") term on chosen trajectories; 0: DPO alone
    logging: IPDPOLoggingSettings = field(default_factory=IPDPOLoggingSettings)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.nll_weight < 0:
            raise ValueError(f"nll_weight must be >= 0, got {self.nll_weight}")
        # IP-DPO ranks by the process score itself (pairs.ranking) and matches evidence with sampling.matcher.
        if self.reward.process_weight:
            raise ValueError(
                "reward.process_weight is GRPO's process-aware reward; IP-DPO ranks by the process score "
                "itself: set pairs.ranking instead"
            )
        if self.reward.matcher != "lexical":
            raise ValueError("IP-DPO's evidence matcher is sampling.matcher, not reward.matcher")
        _grpo_only_filter(self, "train-ipdpo")


def _grpo_only_filter(config: RunConfig, command: str) -> None:
    """The difficulty filter picks GRPO's questions; elsewhere it would be silently ignored, so it is refused."""
    if config.data.difficulty_filter.enabled:
        raise ValueError(
            f"data.difficulty_filter is a train-grpo option; {command} does not filter its questions (turn it off)"
        )
