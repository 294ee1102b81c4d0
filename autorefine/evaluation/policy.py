"""Loading a policy to evaluate: the training run's limits and template as defaults, engine, retriever, loop.

Evaluation should run a checkpoint with the turn and token limits it was trained with. Our trainers write
`autorefine_config.yaml` into every checkpoint; when one is found next to the model (or in its run folder)
its `rollout` section, `template` and `reward` section are the defaults, and command-line flags override them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autorefine.protocol import NO_RETRIEVAL_TEMPLATE_NAME, PromptTemplate
from autorefine.retrieval import RetrieverSettings
from autorefine.rollout.agent import AgentLoop, RolloutSettings
from autorefine.scoring.reward import RewardSettings
from autorefine.settings import RUN_CONFIG_FILE, ConfigError, build, parse_yaml

logger = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """An evaluation cannot start or continue; the message says why and what to do."""


@dataclass(frozen=True)
class TrainingDefaults:
    """Rollout limits, prompt template and reward of the run that made a checkpoint (package defaults if unknown)."""

    rollout: RolloutSettings = RolloutSettings()
    template: str | None = None  # template file; None: the packaged template
    reward: RewardSettings = RewardSettings()
    source: str | None = None  # the autorefine_config.yaml they were read from


def find_run_config(model: str | Path) -> Path | None:
    """`autorefine_config.yaml` of a checkpoint: in it, in its run folder, or in that folder's newest checkpoint."""
    model = Path(model)
    if not model.is_dir():
        return None  # a hub name: no training run to read
    run_dir = model.parent
    # Policies saved by our trainers carry the file; the run folder and its checkpoints have it too.
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for candidate in [
        model / RUN_CONFIG_FILE,
        run_dir / RUN_CONFIG_FILE,
        *(c / RUN_CONFIG_FILE for c in checkpoints),
    ]:
        if candidate.is_file():
            return candidate
    return None


def training_defaults(model: str | Path) -> TrainingDefaults:
    """The defaults a checkpoint's run config gives, or the package defaults when there is none."""
    path = find_run_config(model)
    if path is None:
        return TrainingDefaults()
    data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections")
    template = data.get("template")
    if template is not None and not isinstance(template, str):
        raise ConfigError(f"{path}: template must be a file path, got {template!r}")
    return TrainingDefaults(
        rollout=build(RolloutSettings, _known(RolloutSettings, data.get("rollout")), "rollout"),
        template=template,
        reward=build(RewardSettings, _known(RewardSettings, data.get("reward")), "reward"),
        source=str(path),
    )


def _known(cls: type, section: Any) -> Any:
    # A run config may carry settings evaluation has no use for (engine choice, newer keys): skip them.
    if not isinstance(section, dict):
        return section or {}
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in section.items() if k in names}


def resolve_rollout(
    defaults: TrainingDefaults,
    overrides: dict[str, int | None],
    template: str | None,
    no_retrieval: bool = False,
) -> tuple[RolloutSettings, PromptTemplate]:
    """Rollout limits and template: the training defaults with every non-None override applied.

    Without retrieval the loop allows no search (`max_turns` 0: one answering turn) and the default prompt is
    the packaged no-retrieval template.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    if no_retrieval:
        if given.get("max_turns", 0) != 0:
            raise ConfigError(
                f"--no-retrieval runs no search; --max-turns {given['max_turns']} contradicts it"
            )
        given["max_turns"] = 0
    try:
        rollout = dataclasses.replace(defaults.rollout, **given)
    except (TypeError, ValueError) as err:
        raise ConfigError(str(err)) from err
    if template is not None:
        return rollout, PromptTemplate.load(template)
    if no_retrieval:
        return rollout, PromptTemplate.packaged(NO_RETRIEVAL_TEMPLATE_NAME)
    return rollout, PromptTemplate.load(defaults.template)


def build_engine(model: str, **engine_options: Any) -> Any:
    """`engine_from_checkpoint`, with a missing vLLM reported as an evaluation error."""
    from autorefine.rollout.engines import engine_from_checkpoint

    try:
        return engine_from_checkpoint(model, **engine_options)
    except ImportError as err:
        raise EvaluationError(f"--engine vllm: {err}") from None


def engine_identity(engine: str, dtype: str) -> dict[str, str]:
    """Engine and weight dtype as the run identity records them ('auto' resolved where it is this machine's)."""
    if engine == "transformers":
        from autorefine.modeling import resolve_dtype

        dtype = str(resolve_dtype(dtype)).removeprefix("torch.")
    return {"engine": engine, "dtype": dtype}


def connect(url: str) -> Any:
    """A client to the retriever at `url` (replicas: comma-separated URLs), checked ready (`connect_retriever`)."""
    from autorefine.retrieval import connect_retriever

    try:
        settings = RetrieverSettings(url=url)
    except ValueError as err:
        raise ConfigError(f"--retriever-url: {err}") from None
    return connect_retriever(settings)


class NoRetrieval:
    """The searcher of a no-retrieval run, whose loop allows no search: being asked is a bug."""

    def search(self, queries: list[str], topk: int = 3) -> list[Any]:
        """Never answers."""
        raise RuntimeError(f"a no-retrieval run was asked to search for {queries!r}")


@dataclass
class LoadedPolicy:
    """An agent loop ready to answer, the reward to score with, and what was loaded (for metrics.json)."""

    loop: AgentLoop
    reward: RewardSettings
    record: dict[str, Any]


def load_policy_and_loop(
    model: str,
    retriever_url: str | None,
    *,
    template: str | None = None,
    overrides: dict[str, int | None] | None = None,
    no_retrieval: bool = False,
    **engine_options: Any,
) -> LoadedPolicy:
    """The training defaults with `overrides` applied, a checked retriever (it fails faster), then the model.

    With `no_retrieval` the model answers alone: no retriever, no search, the no-retrieval prompt.
    """
    defaults = training_defaults(model)
    rollout, prompt = resolve_rollout(defaults, overrides or {}, template, no_retrieval)
    if no_retrieval:
        searcher: Any = NoRetrieval()
    elif retriever_url:
        searcher = connect(retriever_url)
    else:
        raise ConfigError(
            "a retriever URL is needed (--retriever-url), or --no-retrieval to answer without one"
        )
    loop = AgentLoop(build_engine(model, **engine_options), searcher, rollout, prompt)
    record = {
        "model": str(Path(model).resolve()) if Path(model).is_dir() else model,
        "adapter": str(Path(adapter).resolve()) if (adapter := engine_options.get("adapter")) else None,
        "retrieval": not no_retrieval,
        "defaults_from": defaults.source or "package defaults (no autorefine_config.yaml found)",
        "overrides": {k: v for k, v in (overrides or {}).items() if v is not None},
        **engine_identity(engine_options.get("engine", "transformers"), engine_options.get("dtype", "auto")),
    }
    if defaults.source:
        logger.info("rollout limits and template from %s", defaults.source)
    return LoadedPolicy(loop, defaults.reward, record)
