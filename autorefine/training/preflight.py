"""What a training start checks from its configuration alone, in order; `--check` runs the same checks.

A real start stops at the first refusal, with its message, before it contacts a server or loads a model.
`--check` runs every check and reports them all, for validating a GPU configuration on a login node: the GPU,
vLLM and retriever a launch needs are listed rather than refused, files missing here are listed as needed at
launch (a file that exists is read and checked), and nothing contacts a server or loads a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from autorefine.data import DataError
from autorefine.retrieval import RetrieverSettings, parse_urls
from autorefine.settings import ConfigError, to_dict
from autorefine.training.arguments import RunError, gpu_switches, with_trainer_defaults
from autorefine.training.ipdpo.pairs import PairError

T = TypeVar("T")
# What a configuration check raises: a refusal with its reason.
REFUSALS = (RunError, ConfigError, DataError, PairError, ValueError, FileNotFoundError)


@dataclass
class Preflight:
    """The checks of one start: a real start raises the first refusal, `--check` collects them all."""

    command: str
    checking: bool = False
    refusals: list[str] = field(default_factory=list)
    needs: list[str] = field(default_factory=list)

    def run(self, what: str, check: Callable[[], T]) -> T | None:
        """Run one check; on `--check` a refusal is recorded (and None returned) instead of raised."""
        try:
            return check()
        except REFUSALS as err:
            if not self.checking:
                raise
            self.refusals.append(f"{what}: {err}")
            return None

    def file(self, what: str, path: str | Path | None, read: Callable[[Any], T]) -> T | None:
        """Read a file the run needs; on `--check` one missing here is listed as needed at launch."""
        if path is None:
            return None
        if self.checking and not Path(path).exists():
            self.needs.append(f"{what}: {path} (not found here)")
            return None
        return self.run(what, lambda: read(path))

    def need(self, what: str) -> None:
        """Something the launch needs (listed by `--check`)."""
        self.needs.append(what)

    def trainer(self, trainer: dict[str, Any], args_cls: type) -> None:
        """List the GPU the trainer section asks for (bf16/fp16, vLLM) and, with `use_vllm`, vLLM itself."""
        values = with_trainer_defaults(dict(trainer), args_cls)
        if switches := gpu_switches(values):
            self.need(f"CUDA GPUs (trainer.{', trainer.'.join(f'{k}=true' for k in switches)})")
        if values.get("use_vllm"):
            self.need(
                f"vLLM (`pip install 'autorefine[gpu]'`), mode {values.get('vllm_mode', 'colocate')}"
                + (
                    f" at {values.get('vllm_server_base_url') or values.get('vllm_server_host', '0.0.0.0')}"
                    if values.get("vllm_mode") == "server"
                    else ""
                )
            )

    def retriever(self, settings: RetrieverSettings) -> None:
        """List the retriever replicas a launch needs (not contacted; `prefer_local` is resolved on each node)."""
        local = parse_urls(settings.local_url) if settings.local_url else []
        first = f" (this node's first: {', '.join(local)})" if local else ""
        if settings.prefer_local:
            first += " (each node's own first)"
        self.need(f"a retriever answering at {', '.join(settings.urls)}{first}")

    def report(self, config: Any) -> int:
        """Print the resolved configuration, what the launch needs and the refusals; 0 when none, else 2."""
        print(f"# {self.command} --check: the resolved configuration\n")
        print(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())
        print("\n# what the launch needs")
        for need in self.needs or ["nothing beyond this configuration"]:
            print(f"- {need}")
        if not self.refusals:
            print("\n# OK: every check that depends on the configuration alone passes")
            return 0
        print(f"\n# refused ({len(self.refusals)}): the launch would stop on the first")
        for refusal in self.refusals:
            print(f"- {refusal}")
        return 2


def require_evidence(evidence: Sequence[str], config: Any) -> None:
    """Refuse a process-aware reward (`reward.process_weight`) on training data without any gold evidence.

    `evidence`: each training question's `metadata.evidence` as JSON (GRPO's dataset column). Questions without
    evidence get the plain reward; when none has any, the weight would silently change nothing.
    """
    with_evidence = sum(1 for items in evidence if json.loads(items))
    if not with_evidence:
        raise RunError(
            f"reward.process_weight={config.reward.process_weight} needs gold evidence, but none of the "
            f"{len(evidence)} questions of {config.data.train_file} has any (metadata.evidence): add evidence "
            "to the data (docs/process-score.md: Where evidence comes from) or set reward.process_weight=0"
        )
