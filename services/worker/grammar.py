"""Constrained decoding on the worker: one llguidance matcher per constrained request, and the
batch's token masks.

Why it is shaped this way:

- The grammar arrives compiled to llguidance's JSON grammar text by the front door (which also
  refused the ones that do not compile), so the worker only binds it to the vocabulary. The
  vocabulary (an `LLTokenizer`: a second or more to build, with the tokenizer load) is built on a
  background thread when the worker starts (`warm_in_background`), so the first constrained
  request does not stall every request in its batch; without warming it is built on first use.
- A matcher is rebuilt from the request's tokens so far whenever the worker first sees the request
  (`NewRequest.output_token_ids`): after preemption, migration to another worker, or a front door
  resubmitting it to a new scheduler, the grammar goes on from where the output is.
- Masks are computed only for the constrained rows of a step (a bitmask per row from llguidance,
  unpacked to booleans), and only those rows' logits are touched; a batch with none pays nothing.
- A grammar that cannot be bound, or a sampled token the matcher refuses, fails that request alone
  (its reply carries the error); the rest of the batch goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import llguidance
import llguidance.hf
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

logger = logging.getLogger(__name__)

_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(Exception):
    """A grammar that cannot be bound to the vocabulary, or tokens it does not accept."""


class Grammars:
    """Binds grammars to the model's vocabulary; see the module docstring."""

    def __init__(self, load_tokenizer: Callable[[], object], vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self._load_tokenizer = load_tokenizer
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def warm_in_background(self) -> None:
        def warm() -> None:
            try:
                self.tokenizer  # noqa: B018 - built for its side effect
            except Exception as e:  # noqa: BLE001 - a constrained request will report it
                logger.warning("grammar vocabulary not built (constrained requests will fail): %s", e)

        threading.Thread(target=warm, name="grammar-vocabulary", daemon=True).start()

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                # EOS is the model's end of turn (generation_config), which is what a finished
                # grammar must allow; the tokenizer's own eos may be another token.
                self._tokenizer = llguidance.hf.from_tokenizer(
                    self._load_tokenizer(), n_vocab=self._vocab_size, eos_token=self._eos_token_ids or None)
                logger.info("grammar vocabulary built (%d tokens)", self._vocab_size)
            return self._tokenizer

    def matcher(self, grammar: str, output_token_ids: Sequence[int]) -> llguidance.LLMatcher:
        """A matcher for `grammar` that has consumed `output_token_ids` (the request's tokens so far)."""
        try:
            tokenizer = self.tokenizer
        except Exception as e:  # noqa: BLE001 - e.g. a model directory without a tokenizer
            raise GrammarError(f"grammar: this worker has no vocabulary for grammars ({e})") from e
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"grammar: {matcher.get_error()}")
        if output_token_ids and not matcher.consume_tokens(list(output_token_ids)):
            raise GrammarError(f"grammar: the output so far does not match it ({matcher.get_error()})")
        return matcher


def token_masks(matchers: Sequence[llguidance.LLMatcher], num_vocab: int) -> torch.Tensor:
    """Allowed tokens of each matcher's next step, as bool ``[len(matchers), num_vocab]``."""
    bitmask = allocate_token_bitmask(len(matchers), num_vocab)
    for i, matcher in enumerate(matchers):
        fill_next_token_bitmask(matcher, bitmask, i)
    bits = (bitmask.unsqueeze(-1) >> _BIT_SHIFTS) & 1
    return bits.view(len(matchers), -1)[:, :num_vocab].bool()


def advance(matcher: llguidance.LLMatcher, token_id: int) -> None:
    """Feeds a sampled token; the mask allowed it, so a refusal is a bug worth failing the request for."""
    if not matcher.consume_token(token_id):
        raise GrammarError(f"grammar: token {token_id} refused ({matcher.get_error()})")
