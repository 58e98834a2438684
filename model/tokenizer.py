"""Tokenizer, chat template and streaming text: `transformers`' tokenizer, our bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoTokenizer

_CONTEXT_TOKENS = 6
"""Prompt tokens kept as left context so the first generated piece decodes with its space."""


class Tokenizer:
    """The model folder's tokenizer with the few operations the engine and server need."""

    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        self.hf = AutoTokenizer.from_pretrained(model_dir)
        eos: list[int] = []
        if self.hf.eos_token_id is not None:
            eos.append(self.hf.eos_token_id)
        for t in _model_eos_ids(model_dir):
            if t not in eos:
                eos.append(t)
        self.eos_token_ids: tuple[int, ...] = tuple(eos)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise ValueError("this model's tokenizer has no chat template; use completions")
        return self.hf.apply_chat_template(messages, tokenize=False,
                                           add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict],
                            add_generation_prompt: bool = True) -> list[int]:
        """The prompt token ids of a chat (the template already carries any BOS)."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


def _model_eos_ids(model_dir: Path) -> list[int]:
    """The model's end ids: generation_config.json's, else config.json's (as `generate` does)."""
    for name in ("generation_config.json", "config.json"):
        file = model_dir / name
        if file.exists():
            value = json.loads(file.read_text()).get("eos_token_id")
            return [t for t in (value if isinstance(value, list) else [value])
                    if isinstance(t, int)]
    return []


class IncrementalDetokenizer:
    """Turns generated ids into text one token at a time, never emitting half a character.

    Decodes a short window (prefix..end) and emits what it adds over the window's known part,
    as vLLM and TGI do; cost per token is independent of the length so far.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix = 0
        self.read = len(self.ids)
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        decode = self.tokenizer.decode
        known = decode(self.ids[self.prefix:self.read])
        full = decode(self.ids[self.prefix:])
        if len(full) <= len(known) or full.endswith("\ufffd"):
            return ""  # a special token, or bytes of a character not complete yet
        delta = full[len(known):]
        self.prefix, self.read = self.read, len(self.ids)
        self.text += delta
        return delta


class StopChecker:
    """Finds the first stop string in generated text."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.max_len = max((len(s) for s in self.stops), default=0)

    @property
    def max_holdback(self) -> int:
        """Characters at the end that may still grow into a stop string."""
        return max(self.max_len - 1, 0)

    def check(self, text: str, num_new_chars: int) -> int | None:
        """Where to cut `text` (the start of the earliest stop string), or None.

        Only matches that reach into the last `num_new_chars` characters are new.
        """
        boundary = len(text) - max(num_new_chars, 0)
        # Each stop from its own reach: a short stop lying wholly in the old text is not new.
        found = [i for s in self.stops if (i := text.find(s, max(0, boundary - len(s) + 1))) >= 0]
        return min(found) if found else None
