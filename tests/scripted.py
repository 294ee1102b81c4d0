"""A scripted `GenerationEngine` for agent-loop tests: plays fixed turns per prompt, shaped like a real engine."""

from __future__ import annotations

from dataclasses import dataclass

from autorefine.rollout import Generation


@dataclass
class Turn:
    text: str
    finish: str = "stop"  # "stop" | "eos"


class ScriptedEngine:
    """Plays a fixed list of turns per question; records every generation it returned."""

    def __init__(
        self, tokenizer, scripts: dict[tuple[int, ...], list[Turn]], eos_ids: set[int] | None = None
    ):
        self.tokenizer = tokenizer
        self.scripts = scripts
        if eos_ids is not None:  # as `TransformersEngine.eos_ids`: the tokenizer's EOS and the model's
            self.eos_ids = eos_ids
        self.calls: dict[tuple[int, ...], int] = dict.fromkeys(scripts, 0)
        self.returned: dict[tuple[int, ...], list[list[int]]] = {k: [] for k in scripts}

    def generate(self, prompts, max_new_tokens, params, stop) -> list[Generation]:
        out = []
        for context, budget in zip(prompts, max_new_tokens, strict=True):
            key = next(k for k in self.scripts if tuple(context[: len(k)]) == k)
            turn = self.scripts[key][self.calls[key]]
            self.calls[key] += 1
            ids = self.tokenizer.encode(turn.text, add_special_tokens=False)
            finish = turn.finish
            if turn.finish == "eos" and (not ids or ids[-1] not in getattr(self, "eos_ids", ())):
                ids = [*ids, self.tokenizer.eos_token_id]
            if len(ids) > budget:
                ids, finish = ids[:budget], "length"
            self.returned[key].append(ids)
            out.append(Generation(ids, [-0.5] * len(ids), finish))
        return out
