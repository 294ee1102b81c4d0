"""Finding checkpoints, and saving a run's final policy (LoRA adapters merged into plain model folders)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autorefine.settings import RUN_CONFIG_FILE

if TYPE_CHECKING:
    from transformers import Trainer


def latest_checkpoint(output_dir: str | Path) -> str | None:
    """Path of the newest `checkpoint-N` folder (transformers' own rule: other names are ignored), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def is_peft(model: Any) -> bool:
    """Whether `model` is a peft model (LoRA adapters over a base model)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_final(trainer: Trainer) -> Path:
    """Save the policy and tokenizer to <output_dir>/final, with the run config and the whole log history.

    A LoRA policy is saved twice: its adapter in `final/adapter`, and the adapter merged into the base weights
    (in fp32, on the CPU) as a plain model folder in `final`, which evaluation, vLLM and a next training stage
    load like any model. The merge happens in place, so the trainer's model is no longer usable afterwards.
    """
    output_dir = Path(trainer.args.output_dir)
    final = output_dir / "final"
    model = trainer.accelerator.unwrap_model(trainer.model)
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    if is_peft(model) and not sharded:
        trainer.save_model(str(final / "adapter"))
        if trainer.is_world_process_zero():
            merged_in_fp32(model).save_pretrained(str(final))
            trainer.processing_class.save_pretrained(str(final))
    else:
        # Sharded LoRA weights cannot be merged on one process: `final` then holds the adapter only.
        trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        if (output_dir / RUN_CONFIG_FILE).is_file():
            shutil.copyfile(output_dir / RUN_CONFIG_FILE, final / RUN_CONFIG_FILE)
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
    return final


def merged_in_fp32(model: Any) -> Any:
    """A peft model's adapters folded into its base weights in float32 (on the CPU): a plain model.

    LoRA deltas are small next to the weights they update (~1e-5 against ~0.02): added in bf16 most of them
    round away, so the merge, and the folder it is saved to, stay in float32.
    """
    import torch

    return model.to(device="cpu", dtype=torch.float32).merge_and_unload()


def merge_adapter(base: str, adapter: Path, out: Path) -> None:
    """Fold a LoRA adapter saved in `adapter` into the policy `base` (in fp32) and save a plain HF model folder
    in `out`."""
    from peft import PeftModel

    from autorefine.modeling import load_policy

    model = PeftModel.from_pretrained(load_policy(base, dtype="float32"), str(adapter))
    merged_in_fp32(model).save_pretrained(str(out))
    shutil.rmtree(adapter)
