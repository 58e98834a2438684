"""TextState: a request's incremental detokenisation and stop strings, one token at a time.

Owns what text a streaming client has been sent; knows nothing of scheduling (the engine finishes
a sequence whose stop string appeared). Imports `model.tokenizer` only.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.model.tokenizer import IncrementalDetokenizer, StopChecker


@dataclass(slots=True)
class TextState:
    detokenizer: IncrementalDetokenizer
    stop: StopChecker | None
    num_emitted_chars: int = 0

    def push(self, token_id: int, is_finished: bool) -> tuple[str, str, bool]:
        """(new text to send, all text sent so far, whether a stop string ended the text).

        Text that could still become a stop string is held back unless the sequence is done."""
        self.detokenizer.push(token_id)
        text = self.detokenizer.text
        stopped = False
        if self.stop is not None:
            at = self.stop.check(text, len(text) - self.num_emitted_chars)
            if at is not None:
                text, stopped = text[:at], True
        end = len(text)
        if self.stop is not None and not (is_finished or stopped):
            end = max(self.num_emitted_chars, len(text) - self.stop.max_holdback)
        new_text = text[self.num_emitted_chars:end]
        self.num_emitted_chars = end
        return new_text, text[:end], stopped
