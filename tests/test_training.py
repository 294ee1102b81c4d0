"""GRPO and SFT through the real TRL trainers on the synthetic task: masking, resume, failures, learning."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from autorefine.config import GRPORunConfig, SFTRunConfig
from autorefine.modeling import load_policy, load_tokenizer
from autorefine.protocol import PromptTemplate
from autorefine.retrieval import RetrieverClient, RetrieverUnavailableError
from autorefine.rollout import AgentLoop, SamplingParams
from autorefine.rollout.hf_engine import TransformersEngine
from autorefine.settings import load_config
from autorefine.training.arguments import RunError
from autorefine.training.checkpoints import latest_checkpoint
from autorefine.training.grpo.trainer import build_trainer, run_grpo
from autorefine.training.sft.trainer import sft_example
from tests.helpers import REPO_ROOT, SYNTHETIC_DIR, RefusingProxy, tiny_grpo_config

TINY_CPU = REPO_ROOT / "configs" / "grpo" / "tiny-cpu.yaml"


tiny_config = tiny_grpo_config


# --- masking: documents are attended to but never trained on ---------------------------------------------


class CaptureLossInputs:
    """Hooks the decoder during the training forward/backward: token ids, attention mask, dLoss/dhidden."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.hidden_grads: list[torch.Tensor] = []

        def keep(module, args, kwargs, output):
            if not torch.is_grad_enabled():
                return
            self.inputs.append(
                (kwargs["input_ids"].detach().clone(), kwargs["attention_mask"].detach().clone())
            )
            output.last_hidden_state.register_hook(
                lambda grad: self.hidden_grads.append(grad.detach().clone())
            )

        # TRL scores tokens from the decoder's last hidden states (its fused, chunked LM head): the gradient
        # at position p is the gradient of the loss term that predicts token p + 1.
        model.get_decoder().register_forward_hook(keep, with_kwargs=True)


def test_env_tokens_get_no_gradient_but_are_attended(synthetic_bm25_server, tmp_path):
    config = tiny_config(
        synthetic_bm25_server,
        tmp_path,
        "trainer.max_steps=1",
        "trainer.per_device_train_batch_size=16",
        "trainer.num_generations=4",
        "trainer.seed=3",
    )
    trainer, rollout = build_trainer(config)
    capture = CaptureLossInputs(trainer.model)
    trainer.train()

    trajectories = [t for _, t in rollout.latest]
    [(input_ids, attention_mask)] = capture.inputs
    [grad] = capture.hidden_grads  # (batch, positions, hidden)
    checked_env = checked_model = 0
    for row in range(input_ids.shape[0]):
        ids = input_ids[row][attention_mask[row].bool()].tolist()
        t = next(t for t in trajectories if t.prompt_ids + t.completion_ids == ids)
        start = int(attention_mask[row].nonzero()[0]) + len(
            t.prompt_ids
        )  # first completion token (after padding)
        completion_attention = attention_mask[row, start : start + len(t.completion_ids)]
        assert completion_attention.tolist() == [1] * len(t.completion_ids), (
            "documents stay visible to attention"
        )
        for j, keep in enumerate(t.env_mask):
            g = grad[row, start + j - 1].abs().sum().item()  # the position that predicts completion token j
            if keep == 0:
                assert g == 0.0, f"row {row}: environment token {j} received gradient"
                checked_env += 1
            elif g > 0:
                checked_model += 1
    assert checked_env > 0, "the batch must contain documents"
    assert checked_model > 0, "model tokens with a non-zero advantage must receive gradient"


def test_documents_change_what_the_model_predicts(synthetic_bm25_server):
    """Attention reaches the inserted documents: different documents, different next-token distribution."""
    model = load_policy(SYNTHETIC_DIR / "warmstart", dtype="float32").eval()
    config = tiny_config(synthetic_bm25_server, Path("unused"))
    tokenizer = load_tokenizer(SYNTHETIC_DIR / "warmstart")
    with RetrieverClient(synthetic_bm25_server) as client:
        loop = AgentLoop(
            TransformersEngine(model, tokenizer), client, config.rollout, PromptTemplate.load(config.template)
        )
        [t] = loop.run(["What is the home city of Bigu Brenmair?"], SamplingParams(temperature=0))
    docs = next(s for s in t.segments if s.kind == "documents")
    ids = torch.tensor([t.prompt_ids + t.completion_ids[: docs.end]])
    shuffled = ids.clone()
    start = len(t.prompt_ids) + docs.start + 3
    shuffled[0, start : len(t.prompt_ids) + docs.end - 3] = shuffled[
        0, start : len(t.prompt_ids) + docs.end - 3
    ].flip(0)
    with torch.no_grad():
        a = torch.log_softmax(model(ids).logits[0, -1], -1)
        b = torch.log_softmax(model(shuffled).logits[0, -1], -1)
    assert (a - b).abs().max() > 1e-3


# --- exact resume -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resume_matches_an_uninterrupted_run(synthetic_bm25_server, tmp_path):
    """Two generation batches of two optimizer steps each, held-out evaluation and save_best, cut after one."""
    overrides = (
        "trainer.max_steps=4",
        "trainer.steps_per_generation=2",  # TRL buffers one generation batch for two steps
        "trainer.per_device_train_batch_size=16",
        "trainer.save_strategy=steps",
        "trainer.save_steps=2",
        "trainer.seed=5",
        f"heldout.file={SYNTHETIC_DIR / 'heldout.jsonl'}",
        "heldout.limit=8",
        "heldout.every=2",
        "heldout.save_best=true",
    )
    full = build_trainer(tiny_config(synthetic_bm25_server, tmp_path / "full", *overrides))[0]
    full.train()
    interrupted = build_trainer(
        tiny_config(synthetic_bm25_server, tmp_path / "part", *overrides, "trainer.max_steps=2")
    )[0]
    interrupted.train()
    checkpoint = latest_checkpoint(tmp_path / "part")
    assert checkpoint is not None and checkpoint.endswith("checkpoint-2")
    # a checkpoint is a plain HF model directory with its tokenizer
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in Path(checkpoint).iterdir()
    }
    resumed = build_trainer(tiny_config(synthetic_bm25_server, tmp_path / "part", *overrides))[0]
    resumed.train(resume_from_checkpoint=checkpoint)
    for (name, a), (_, b) in zip(
        full.model.named_parameters(), resumed.model.named_parameters(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    # rewards are logged once per generation batch: the batch of steps 3-4 was generated after the resume
    assert rewards_after(full, 2) and rewards_after(full, 2) == pytest.approx(rewards_after(resumed, 2))
    part, whole = heldout_rows(tmp_path / "part"), heldout_rows(tmp_path / "full")
    assert [r["step"] for r in part] == [0, 2, 4]  # step 2 is not evaluated again on resume
    assert len(part) == len(whole) and all(p == pytest.approx(w) for p, w in zip(part, whole, strict=True))
    best = lambda run: tmp_path / run / "best"  # noqa: E731
    assert (best("part") / "heldout_best.json").read_text() == (
        best("full") / "heldout_best.json"
    ).read_text()
    for name in ("model.safetensors", "config.json"):
        assert (best("part") / name).read_bytes() == (best("full") / name).read_bytes()


def rewards_after(trainer, step: int) -> dict[int, float]:
    """Logged rewards by step, for the steps after `step`."""
    return {h["step"]: h["reward"] for h in trainer.state.log_history if "reward" in h and h["step"] > step}


def heldout_rows(run: Path) -> list[dict]:
    """The run's held-out evaluations, without their wall times."""
    rows = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def test_a_resumed_run_keeps_a_better_best_policy(synthetic_bm25_server, tmp_path):
    overrides = (
        "trainer.max_steps=1",
        "trainer.save_strategy=steps",
        "trainer.save_steps=1",
        f"heldout.file={SYNTHETIC_DIR / 'heldout.jsonl'}",
        "heldout.limit=4",
        "heldout.every=1",
        "heldout.save_best=true",
    )
    build_trainer(tiny_config(synthetic_bm25_server, tmp_path, *overrides))[0].train()
    record = tmp_path / "best" / "heldout_best.json"
    assert json.loads(record.read_text())["step"] in (0, 1)
    # the best policy so far scored higher than anything the resumed run will reach
    record.write_text(json.dumps({"step": 1, "reward": 2.0, "em": 1.0}))
    saved = (tmp_path / "best" / "model.safetensors").read_bytes()
    resumed = build_trainer(tiny_config(synthetic_bm25_server, tmp_path, *overrides, "trainer.max_steps=2"))[
        0
    ]
    resumed.train(resume_from_checkpoint=latest_checkpoint(tmp_path))
    assert resumed.state.global_step == 2
    assert json.loads(record.read_text())["reward"] == 2.0
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == saved


# --- failures ----------------------------------------------------------------------------------------------


def test_unreachable_retriever_fails_before_loading_the_model(tmp_path, free_port, monkeypatch):
    import autorefine.training.grpo.trainer as grpo

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the retriever is down")

    monkeypatch.setattr(grpo, "load_tokenizer_and_policy", must_not_load)
    url = f"http://127.0.0.1:{free_port()}"
    config = tiny_config(url, tmp_path, "retriever.startup_wait_s=1")
    with pytest.raises(RetrieverUnavailableError, match=f"retriever at {url} not ready"):
        build_trainer(config)


class StopServerAfterFirstStep(TrainerCallback):
    def __init__(self, process) -> None:
        self.process = process

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.process.terminate()
            self.process.wait(timeout=10)


def test_lost_retriever_writes_a_checkpoint_and_says_how_to_resume(tmp_path, start_retriever, free_port):
    from retriever_server.build import build_index

    index = tmp_path / "index"
    build_index(SYNTHETIC_DIR / "corpus.jsonl", index, index_type="bm25", progress=False)
    port = free_port()
    with start_retriever(index, port=port) as (url, process):
        config = tiny_config(
            url, tmp_path / "run", "trainer.max_steps=3", "retriever.max_retries=1", "trainer.seed=1"
        )
        trainer, _ = build_trainer(config)
        trainer.add_callback(StopServerAfterFirstStep(process))
        with pytest.raises(RunError) as err:
            run_grpo(trainer, command="autorefine train-grpo --config tiny-cpu.yaml")
    message = str(err.value)
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.endswith("checkpoint-1")
    assert f"resume with: autorefine train-grpo --config tiny-cpu.yaml --resume {checkpoint}" in message
    assert url in message
    # once the retriever is back, the run resumes from that checkpoint and finishes
    with start_retriever(index, port=port):
        resumed, _ = build_trainer(config)
        run_grpo(resumed, resume="latest")
    assert resumed.state.global_step == 3
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()


class BreakEngineAfterFirstStep(TrainerCallback):
    """From step 2 on, the engine raises as TRL's vLLM client does on an HTTP 400."""

    def __init__(self, rollout) -> None:
        self.rollout = rollout

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:

            def broken(*args):
                raise RuntimeError("Request failed: 400, injected engine failure")

            self.rollout.engine.engine.generate = broken


def test_an_engine_failure_writes_a_checkpoint_and_says_how_to_resume(synthetic_bm25_server, tmp_path):
    config = tiny_config(synthetic_bm25_server, tmp_path / "run", "trainer.max_steps=3")
    trainer, rollout = build_trainer(config)
    trainer.add_callback(BreakEngineAfterFirstStep(rollout))
    with pytest.raises(RunError) as err:
        run_grpo(trainer, command="autorefine train-grpo --config tiny-cpu.yaml")
    message = str(err.value)
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.endswith("checkpoint-1")
    assert (Path(checkpoint) / "trainer_state.json").is_file()
    assert (
        "the generation engine failed: RuntimeError: Request failed: 400, injected engine failure" in message
    )
    assert f"then resume with: autorefine train-grpo --config tiny-cpu.yaml --resume {checkpoint}" in message


class RefuseAfterFirstStep(TrainerCallback):
    """The retriever's key changes after step 1: from then on it answers 401."""

    def __init__(self, proxy) -> None:
        self.proxy = proxy

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.proxy.refuse()


def test_a_retriever_refusing_the_key_mid_run_writes_a_checkpoint_and_says_how_to_resume(
    synthetic_bm25_server, tmp_path
):
    with RefusingProxy(synthetic_bm25_server) as proxy:
        config = tiny_config(proxy.url, tmp_path / "run", "trainer.max_steps=3")
        trainer, _ = build_trainer(config)
        trainer.add_callback(RefuseAfterFirstStep(proxy))
        with pytest.raises(RunError) as err:
            run_grpo(trainer, command="autorefine train-grpo --config tiny-cpu.yaml")
    message = str(err.value)
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert checkpoint is not None and checkpoint.endswith("checkpoint-1")
    assert (Path(checkpoint) / "trainer_state.json").is_file()
    assert f"{proxy.url}/retrieve rejected the request (401): wrong API key" in message
    assert "The retriever refused access (HTTP 401)" in message
    assert "Give the run the retriever's current API key (retriever.api_key_file" in message
    assert f"then resume with: autorefine train-grpo --config tiny-cpu.yaml --resume {checkpoint}" in message
    assert proxy.refused == 1  # a refusal is final: not retried


def test_every_retriever_failure_that_ends_training_names_its_fix():
    from autorefine.retrieval import RetrieverError
    from autorefine.rollout import GenerationError
    from autorefine.training.grpo.trainer import failure_advice

    cases = {
        "The retriever stayed down": RetrieverUnavailableError("unreachable"),
        "The retriever refused access (HTTP 403)": RetrieverError("refused", status=403),
        "The retriever answered with an error (HTTP 422)": RetrieverError("invalid request", status=422),
        "The retriever answered with an error": RetrieverError("answered with invalid JSON"),
        "The generation engine failed": GenerationError("HTTP 400"),
    }
    for what, err in cases.items():
        assert failure_advice(err)[0] == what


# --- SFT ------------------------------------------------------------------------------------------------


def test_sft_labels_keep_only_model_tokens():
    example = sft_example([1, 2, 3], [10, 11, 12, 13, 14], [1, 1, 0, 0, 1])
    assert example["input_ids"] == [1, 2, 3, 10, 11, 12, 13, 14]
    assert example["labels"] == [-100, -100, -100, 10, 11, -100, -100, 14]


def test_sft_on_gold_traces_then_traces_file(synthetic_bm25_server, tmp_path):
    from autorefine.training.sft.trainer import build_trainer as build_sft

    base = [
        f"retriever.url={synthetic_bm25_server}",
        f"trainer.output_dir={tmp_path / 'sft'}",
        "trainer.max_steps=3",
        "trainer.logging_steps=1",
        "heldout.every=0",
        "tiny_model={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1}",
    ]
    config = load_config(SFTRunConfig, REPO_ROOT / "configs/sft/synthetic-warmstart.yaml", base)
    trainer = build_sft(config)
    labels = trainer.train_dataset[0]["labels"]
    ids = trainer.train_dataset[0]["input_ids"]
    assert -100 in labels and any(label != -100 for label in labels)
    assert all(label in (-100, token) for label, token in zip(labels, ids, strict=True))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)

    # trajectories saved by an earlier GRPO run train the same way
    grpo = tiny_config(
        synthetic_bm25_server, tmp_path / "grpo", "trainer.max_steps=1", "logging.save_rollouts=true"
    )
    build_trainer(grpo)[0].train()
    rows = (tmp_path / "grpo" / "rollouts" / "rank-0.jsonl").read_text().splitlines()
    assert len(rows) == 32 and all(json.loads(r)["env_mask"] for r in rows)
    from_traces = load_config(
        SFTRunConfig,
        REPO_ROOT / "configs/sft/synthetic-warmstart.yaml",
        [*base, f"traces_file={tmp_path / 'grpo' / 'rollouts' / 'rank-0.jsonl'}"],
    )
    assert len(build_sft(from_traces).train_dataset) == 32


# --- proof that the loop learns --------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_raises_heldout_em_from_the_warm_start(synthetic_bm25_server, tmp_path):
    """25 GRPO steps (16 questions × 8 samples, real TRL trainer, BM25 retrieval) improve held-out EM."""
    config = load_config(
        GRPORunConfig,
        TINY_CPU,
        [
            f"retriever.url={synthetic_bm25_server}",
            f"trainer.output_dir={tmp_path}",
            "trainer.report_to=[]",
            "trainer.save_strategy=no",
            "trainer.max_steps=25",
            "heldout.every=25",
            "heldout.save_best=false",
        ],
    )
    trainer, _ = build_trainer(config)
    trainer.train()
    history = [json.loads(line) for line in (tmp_path / "heldout.jsonl").read_text().splitlines()]
    before, after = history[0], history[-1]
    assert (before["step"], after["step"]) == (0, 25)
    assert after["em"] - before["em"] >= 0.02, f"held-out EM {before['em']:.3f} -> {after['em']:.3f}"
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert len(rewards) == 25
    assert statistics.mean(rewards[-5:]) > statistics.mean(rewards[:5])


def test_warm_start_checkpoint_is_small_and_loadable():
    files = {p.name: p.stat().st_size for p in (SYNTHETIC_DIR / "warmstart").iterdir()}
    assert files["model.safetensors"] < 8 * 2**20
    model = load_policy(SYNTHETIC_DIR / "warmstart", dtype="float32")
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6


# --- one engine per trainer; starting on the wrong machine ----------------------------------------------------


def test_the_stop_string_criterion_is_built_once_per_trainer(synthetic_bm25_server, tmp_path, monkeypatch):
    import autorefine.rollout.hf_engine as hf_engine

    built = []

    class Counted(hf_engine.StopStringCriteria):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(hf_engine, "StopStringCriteria", Counted)
    config = tiny_config(
        synthetic_bm25_server,
        tmp_path,
        f"heldout.file={SYNTHETIC_DIR / 'heldout.jsonl'}",
        "heldout.limit=4",
        "heldout.every=1",
        "heldout.save_best=false",
    )
    trainer, rollout = build_trainer(config)
    trainer.train()
    assert trainer.state.global_step == 2 and rollout.batches == 2
    # two rollout batches and three held-out evaluations, on one engine: the vocabulary is walked once
    assert len(built) == 1


def test_a_gpu_preset_on_a_machine_without_gpu_stops_with_one_line(capsys):
    from autorefine.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    preset = REPO_ROOT / "configs/grpo/autorefine-qwen2.5-3b-base.yaml"
    assert main(["train-grpo", "--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith(
        "error: this configuration needs a CUDA GPU (trainer.bf16=true, trainer.use_vllm=true)"
    )


def test_sft_on_saved_rollouts_keeps_whole_trajectories(tmp_path):
    from autorefine.training.sft.trainer import build_trainer as build_sft

    rows = tmp_path / "rollouts.jsonl"
    long = {
        "prompt_ids": [5] * 300,
        "completion_ids": [6] * 1200,
        "env_mask": [1] * 600 + [0] * 500 + [1] * 100,
    }
    short = {"prompt_ids": [5] * 30, "completion_ids": [7] * 20, "env_mask": [1] * 20}
    rows.write_text("".join(json.dumps({"id": str(i), **r}) + "\n" for i, r in enumerate([long, short])))
    base = [
        f"trainer.output_dir={tmp_path / 'sft'}",
        f"traces_file={rows}",
        "heldout.every=0",
        "tiny_model={hidden_size: 32, num_layers: 1, num_heads: 2, num_kv_heads: 1}",
    ]
    trainer = build_sft(load_config(SFTRunConfig, REPO_ROOT / "configs/sft/synthetic-warmstart.yaml", base))
    assert trainer.args.max_length == 1500  # TRL's default 1024 would cut the last model tokens off
    assert sorted(len(x) for x in trainer.train_dataset["input_ids"]) == [50, 1500]
    with pytest.raises(RunError, match="would truncate 1 of 2 SFT examples"):
        build_sft(
            load_config(
                SFTRunConfig,
                REPO_ROOT / "configs/sft/synthetic-warmstart.yaml",
                [*base, "trainer.max_length=1024"],
            )
        )


def test_latest_checkpoint_skips_folders_that_are_no_checkpoint(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-x", "checkpoint-9-old"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-11").write_text("a file, not a checkpoint folder")
    # A stray `checkpoint-x` (a copy, a renamed folder) used to crash `--resume latest` with a ValueError.
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert latest_checkpoint(tmp_path / "missing") is None


# --- process-aware GRPO (reward.process_weight) ----------------------------------------------------------


def test_process_weight_without_any_evidence_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import autorefine.training.grpo.trainer as grpo

    monkeypatch.setattr(
        grpo, "load_tokenizer_and_policy", lambda *a, **k: pytest.fail("the model was loaded")
    )
    # The one-hop synthetic task carries no evidence; no retriever is needed to refuse.
    config = tiny_config("http://127.0.0.1:9", tmp_path, "reward.process_weight=0.5")
    with pytest.raises(RunError, match=r"reward.process_weight=0.5 needs gold evidence, but none of the \d+"):
        build_trainer(config)
    from autorefine.cli import main

    assert main(["train-grpo", "--config", str(TINY_CPU), "--check", "reward.process_weight=0.5"]) == 2


def test_process_aware_grpo_step_adds_the_process_score_to_the_reward(multihop_bm25_server, tmp_path):
    """One real GRPO step on the multi-hop task: each evidence question's reward is its AutoRefine reward plus
    0.5 × its process score, and the term is logged as its own reward component."""
    config = tiny_config(
        multihop_bm25_server,
        tmp_path,
        "model.name_or_path=data/synthetic_multihop/warmstart",
        "template=data/synthetic_multihop/template.txt",
        "data.train_file=data/synthetic_multihop/train.jsonl",
        "rollout.max_turns=3",
        "rollout.max_completion_tokens=448",
        "trainer.max_steps=1",
        "reward.process_weight=0.5",
    )
    trainer, _ = build_trainer(config)
    events = []
    trainer.reward_funcs[0].rewards.subscribe(events.append)
    trainer.train()
    (event,) = events
    assert len(event.scores) == 32
    for score, reward in zip(event.scores, event.rewards, strict=True):
        assert score.process_reward == pytest.approx(0.5 * score.process)
        plain = score.outcome if score.outcome > 0 else 0.1 * score.refine_hit
        assert reward == pytest.approx(score.has_answer * plain + score.process_reward)
    assert any(s.process_reward > 0 for s in event.scores)
    logged = [h for h in trainer.state.log_history if "rewards/process_reward/mean" in h]
    assert logged and logged[0]["rewards/process_reward/mean"] > 0
