"""Smoke test of a training machine, offline: GRPO steps, held-out evaluation, resume, and both vLLM modes.

    scripts/gpu_smoke.sh [--out DIR] [--cpu] [--steps N]

Builds a small random-init Qwen2-shaped policy with the repository's tokenizer (the Qwen2.5 one on a GPU, the
synthetic task's small one with --cpu), serves BM25 over the synthetic corpus with `retriever-server`, then:
a few GRPO steps on the transformers engine (bf16 on a GPU) with a held-out evaluation before and after, a
resume from the last checkpoint, and the same GRPO steps with vLLM colocated and with a `vllm serve` server
when vLLM is installed. Prints versions, then one row per check with the importance-sampling ratio of the
last rollout batch (exp(trainer log-prob − rollout log-prob), averaged over model tokens), step times and
peak GPU memory. Everything is written under --out; nothing is downloaded. Exit status 1 if any row failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")

SYNTHETIC = REPO / "data" / "synthetic"


@dataclass
class Row:
    """One check of the table."""

    name: str
    status: str = "pass"  # pass | FAIL | skipped: why
    seconds: float = 0.0
    is_ratio: float | None = None
    step_s: float | None = None
    peak_gpu_mib: float | None = None
    detail: str = ""


def versions() -> list[str]:
    """What this machine runs, for the top of the report."""
    import torch
    import transformers

    lines = [f"python {sys.version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    lines.append(f"transformers {transformers.__version__}")
    for name in ("trl", "accelerate", "peft", "vllm"):
        try:
            module = __import__(name)
            lines.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            lines.append(f"{name}: not installed")
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    lines.append(f"device: {device}")
    return lines


def vllm_installed() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def build_policy(out: Path, cpu: bool) -> tuple[Path, int]:
    """A random-init Qwen2 (GPU: Qwen2.5 tokenizer, 4 layers of 512; CPU: the synthetic tokenizer, 2 of 64)."""
    from autorefine.modeling import load_tokenizer, tiny_qwen2

    tokenizer = load_tokenizer(SYNTHETIC / "tokenizer" if cpu else REPO / "data/tokenizers/qwen2.5")
    shape = dict(hidden_size=64, num_layers=2) if cpu else dict(hidden_size=512, num_layers=4)
    model = tiny_qwen2(tokenizer, num_heads=4, num_kv_heads=2, max_position_embeddings=2048, **shape)
    folder = out / "policy"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def retriever(out: Path) -> Iterator[str]:
    """`retriever-server serve` over a BM25 index of the synthetic corpus (FAISS-free: nothing to download)."""
    from testbed.retriever import ensure_bm25_index, running_retriever

    index = ensure_bm25_index(SYNTHETIC / "corpus.jsonl", out / "index")
    with (out / "retriever.log").open("wb") as log, running_retriever(index, log=log) as url:
        yield url


def grpo_config(policy: Path, url: str, run: Path, cpu: bool, steps: int, *extra: str) -> Any:
    """GRPO on the synthetic task, sized to take seconds; `extra` overrides as on the command line."""
    from trl import GRPOConfig

    from autorefine.config import GRPORunConfig
    from autorefine.settings import load_config

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    # newer transformers 5 releases renamed gradient checkpointing; take the name this one knows
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    )
    device = ["trainer.use_cpu=true", "trainer.bf16=false"] if cpu else ["trainer.bf16=true"]
    # a CPU run samples less: a random policy writes every turn to its token budget
    turns, tokens, batch = (1, 16, 8) if cpu else (2, 32, 16)
    overrides = [
        f"model.name_or_path={policy}",
        "model.dtype=auto",  # fp32 master weights; bf16 compute on a GPU through trainer.bf16
        f"template={SYNTHETIC / 'template.txt'}",
        f"data.train_file={SYNTHETIC / 'train.jsonl'}",
        f"heldout.file={SYNTHETIC / 'heldout.jsonl'}",
        f"heldout.limit={heldout_questions(cpu)}",
        f"heldout.every={steps}",
        "heldout.batch_size=16",
        "heldout.save_best=true",
        f"retriever.url={url}",
        f"rollout={{max_turns: {turns}, max_new_tokens: {tokens}, max_obs_tokens: 128, max_completion_tokens: 256}}",
        "logging={sample_table_every: 0, save_rollouts: false}",
        f"trainer.output_dir={run}",
        f"trainer.max_steps={steps}",
        "trainer.learning_rate=1.0e-6",  # the presets' rate: its updates must still move fp32 weights
        "trainer.num_generations=4",
        f"trainer.per_device_train_batch_size={batch}",
        "trainer.logging_steps=1",
        "trainer.save_strategy=steps",
        f"trainer.save_steps={steps}",
        "trainer.report_to=[]",
        "trainer.seed=0",
        f"trainer.{checkpointing}=false",
        *device,
        *extra,
    ]
    return load_config(GRPORunConfig, None, overrides)


def sft_config(policy: Path, url: str, run: Path, cpu: bool) -> Any:
    """Three SFT steps at lr 1e-6 on gold traces of the synthetic task, with the presets' dtype settings."""
    from autorefine.config import SFTRunConfig
    from autorefine.settings import load_config

    overrides = [
        f"model.name_or_path={policy}",
        "model.tokenizer=",
        "model.dtype=auto",
        "tiny_model=",
        f"retriever.url={url}",
        f"data.train_file={SYNTHETIC / 'train.jsonl'}",
        "heldout.every=0",
        f"trainer.output_dir={run}",
        "trainer.learning_rate=1.0e-6",
        "trainer.lr_scheduler_type=constant",
        "trainer.warmup_steps=0",
        "trainer.max_steps=3",
        "trainer.per_device_train_batch_size=8",
        *(
            ["trainer.use_cpu=true", "trainer.bf16=false"]
            if cpu
            else ["trainer.use_cpu=false", "trainer.bf16=true"]
        ),
    ]
    return load_config(SFTRunConfig, REPO / "configs/sft/synthetic-warmstart.yaml", overrides)


def heldout_questions(cpu: bool) -> int:
    return 8 if cpu else 16


def is_ratio(trainer: Any, rollout: Any) -> float:
    """mean exp(trainer log-prob − rollout log-prob) over the model tokens of the last rollout batch."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    temperature = trainer.args.temperature
    ratios = []
    for _, t in rollout.latest:
        ids = torch.tensor([t.prompt_ids + t.completion_ids], device=model.device)
        with torch.no_grad():
            logits = model(ids).logits[0, len(t.prompt_ids) - 1 : -1].float() / temperature
        trainer_lp = torch.log_softmax(logits, -1).gather(1, ids[0, len(t.prompt_ids) :, None]).squeeze(1)
        rollout_lp = torch.tensor(t.logprobs, device=model.device)
        keep = torch.tensor(t.env_mask, device=model.device, dtype=torch.bool) & rollout_lp.isfinite()
        ratios.append((trainer_lp - rollout_lp)[keep].exp())
    return torch.cat(ratios).mean().item()


def weights_moved(start: Path, trainer: Any) -> float:
    """Share of the decoder's weights (embeddings aside: unseen tokens get no gradient) that training changed."""
    from safetensors.torch import load_file

    before = load_file(str(start / "model.safetensors"))
    model = trainer.accelerator.unwrap_model(trainer.model)
    changed = total = 0
    for name, after in model.state_dict().items():
        if "embed_tokens" in name or name not in before:
            continue
        changed += int((after.detach().cpu().float() != before[name].float()).sum())
        total += after.numel()
    return changed / total


def step_seconds(trainer: Any) -> float | None:
    times = [h["time/step_s"] for h in trainer.state.log_history if "time/step_s" in h]
    return sum(times[1:]) / len(times[1:]) if len(times) > 1 else (times[0] if times else None)


def train(config: Any, resume: str | None = None) -> tuple[Any, Any]:
    from autorefine.training.grpo.trainer import build_trainer

    trainer, rollout = build_trainer(config)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rollout


def measured(row: Row, check: Callable[[Row], None]) -> Row:
    """Run one check into `row`: seconds, peak GPU memory, and FAIL with the error's last line."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        check(row)
    except Exception as err:
        row.status = "FAIL"
        row.detail = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:160]
        traceback.print_exc()
    row.seconds = time.perf_counter() - started
    if torch.cuda.is_available():
        row.peak_gpu_mib = torch.cuda.max_memory_allocated() / 2**20
    return row


@contextlib.contextmanager
def vllm_server(policy: Path, out: Path) -> Iterator[str]:
    """`vllm serve` on this GPU with what TRL's server mode needs (dev endpoints, NCCL weight transfer)."""
    import httpx

    from testbed.retriever import free_port, stop

    port = free_port()
    command = [
        "vllm", "serve", str(policy), "--host", "127.0.0.1", "--port", str(port),
        "--gpu-memory-utilization", "0.25", "--max-model-len", "1024",
        "--logprobs-mode", "processed_logprobs", "--max-logprobs", "-1",
        "--weight-transfer-config", '{"backend": "nccl"}',
    ]  # fmt: skip
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    with (out / "vllm_server.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"vllm serve exited with {process.returncode}; see {out / 'vllm_server.log'}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not ready after 240 s; see {out / 'vllm_server.log'}")
            time.sleep(1)
        yield url
    finally:
        stop(process)


def run_checks(out: Path, cpu: bool, steps: int) -> list[Row]:
    """Every row of the report, in order; a failed prerequisite fails the rows that need it."""
    import torch

    rows: list[Row] = []
    if not cpu and not torch.cuda.is_available():
        return [Row("cuda device", "FAIL", detail="no CUDA device visible (use --cpu to run on the CPU)")]
    state: dict[str, Any] = {}

    def policy(row: Row) -> None:
        state["policy"], params = build_policy(out, cpu)
        row.detail = f"{params / 1e6:.1f}M parameters, random init"

    rows.append(measured(Row("policy"), policy))
    with contextlib.ExitStack() as stack:

        def serve(row: Row) -> None:
            state["url"] = stack.enter_context(retriever(out))
            from autorefine.retrieval import RetrieverClient

            with RetrieverClient(state["url"]) as client:
                [docs] = client.search(["home city of Bigu Bolvou"], topk=3)
            row.detail = f"BM25 over the synthetic corpus, top hit {docs[0].id}"

        rows.append(measured(Row("retriever"), serve))
        if "policy" not in state or "url" not in state:
            return rows

        def grpo(row: Row) -> None:
            trainer, rollout = train(grpo_config(state["policy"], state["url"], out / "run", cpu, steps))
            assert trainer.state.global_step == steps, f"stopped at step {trainer.state.global_step}"
            state["checkpoint"] = out / "run" / f"checkpoint-{steps}"
            row.is_ratio, row.step_s = is_ratio(trainer, rollout), step_seconds(trainer)
            reward = [h["reward"] for h in trainer.state.log_history if "reward" in h]
            dtype = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
            row.detail = f"{steps} steps, reward {reward[-1]:.3f}, {'fp32 CPU' if cpu else 'bf16 compute'}, {dtype} weights"

        rows.append(measured(Row("grpo transformers"), grpo))

        def heldout(row: Row) -> None:
            history = [json.loads(x) for x in (out / "run" / "heldout.jsonl").read_text().splitlines()]
            assert [h["step"] for h in history] == [0, steps], history
            count = heldout_questions(cpu)
            assert all(h["count"] == count for h in history), history
            assert (out / "run" / "best" / "heldout_best.json").is_file()
            row.detail = (
                f"EM {history[0]['em']:.3f} -> {history[-1]['em']:.3f} on {count} questions, best/ saved"
            )

        rows.append(measured(Row("held-out evaluation"), heldout))

        def resume(row: Row) -> None:
            config = grpo_config(
                state["policy"], state["url"], out / "run", cpu, steps, f"trainer.max_steps={steps + 1}"
            )
            trainer, rollout = train(config, resume=str(state["checkpoint"]))
            assert trainer.state.global_step == steps + 1, f"resumed run ended at {trainer.state.global_step}"
            row.is_ratio, row.step_s = is_ratio(trainer, rollout), step_seconds(trainer)
            row.detail = f"from {state['checkpoint'].name} to step {steps + 1}"

        rows.append(measured(Row("resume"), resume))

        def master_weights(row: Row) -> None:
            # A random policy earns no reward, so GRPO's first steps carry no gradient: SFT on gold traces
            # shows whether lr-1e-6 updates survive in the weights (fp32 masters, bf16 compute on a GPU).
            from autorefine.training.sft.trainer import build_trainer as build_sft

            trainer = build_sft(sft_config(state["policy"], state["url"], out / "sft", cpu))
            trainer.train()
            moved = weights_moved(state["policy"], trainer)
            dtype = str(next(trainer.model.parameters()).dtype).removeprefix("torch.")
            row.detail = f"3 SFT steps at lr 1e-6: {moved:.1%} of the {dtype} decoder weights moved"
            assert moved >= 0.99, f"only {moved:.1%} of the trained weights changed"

        rows.append(measured(Row("master weights"), master_weights))

        for mode in ("colocate", "server"):
            if cpu or not vllm_installed():
                rows.append(
                    Row(f"grpo vllm {mode}", "skipped: " + ("--cpu" if cpu else "vllm not installed"))
                )
                continue

            def with_vllm(row: Row, mode: str = mode) -> None:
                extra = [
                    "trainer.use_vllm=true",
                    f"trainer.vllm_mode={mode}",
                    "trainer.vllm_max_model_length=1024",
                ]
                run = out / f"run-vllm-{mode}"
                with contextlib.ExitStack() as server:
                    if mode == "server":
                        extra.append(
                            f"trainer.vllm_server_base_url={server.enter_context(vllm_server(state['policy'], out))}"
                        )
                    else:
                        extra.append("trainer.vllm_gpu_memory_utilization=0.3")
                    trainer, rollout = train(
                        grpo_config(state["policy"], state["url"], run, cpu, steps, *extra)
                    )
                assert trainer.state.global_step == steps
                row.is_ratio, row.step_s = is_ratio(trainer, rollout), step_seconds(trainer)
                logged = [
                    h for h in trainer.state.log_history if "sampling/importance_sampling_ratio/mean" in h
                ]
                trl_ratio = logged[-1]["sampling/importance_sampling_ratio/mean"] if logged else float("nan")
                row.detail = f"{steps} steps; TRL's own IS ratio {trl_ratio:.4f}"

            rows.append(measured(Row(f"grpo vllm {mode}"), with_vllm))
    return rows


def table(rows: list[Row]) -> str:
    """The report as a fixed-width table."""
    header = ("check", "status", "seconds", "IS ratio", "step s", "peak GPU MiB", "detail")

    def cells(r: Row) -> tuple[str, ...]:
        number = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        return (r.name, r.status, f"{r.seconds:.1f}", number(r.is_ratio, ".4f"), number(r.step_s, ".2f"),
                number(r.peak_gpu_mib, ".0f"), r.detail)  # fmt: skip

    body = [header, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in body]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/gpu-smoke", help="folder for everything the checks write")
    parser.add_argument(
        "--cpu", action="store_true", help="run on the CPU (fp32, tiny policy; vLLM rows skipped)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="GRPO steps per run (default: 3 on a GPU, 2 on CPU)"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    steps = args.steps or (2 if args.cpu else 3)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    print("\n".join(versions()), flush=True)
    started = time.perf_counter()
    rows = run_checks(out, args.cpu, steps)
    report = table(rows)
    (out / "report.txt").write_text(report + "\n", encoding="utf-8")
    print(f"\n{report}\n\ntotal {time.perf_counter() - started:.0f} s; report and logs in {out}", flush=True)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
