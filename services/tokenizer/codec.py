"""The model's tokenizer and chat template, from the model directory or GGUF file (never a hub).

Chat messages are rendered to text with the template and then encoded like any prompt, so BOS
is added exactly once (the template itself carries no BOS).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from transformers import PreTrainedTokenizerBase

from services.tokenizer.api_types import ChatMessage, FunctionTool
from services.tokenizer.detokenizer import Decoder
from services.tokenizer.tool_prompt import render_turns, template_messages, template_tools
from shared.gguf_model import GgufModel, is_gguf_path
from shared.gguf_tokenizer import build_tokenizer
from shared.hf_tokenizer import load_tokenizer


class Codec:
    def __init__(self, model_dir: str | Path) -> None:
        self.model_dir = Path(model_dir)
        if is_gguf_path(self.model_dir):
            gguf = GgufModel(self.model_dir)  # validates first: a bad file is one GgufError line
            self.tokenizer: PreTrainedTokenizerBase = build_tokenizer(gguf)  # the file parsed once
            self.max_model_len = gguf.config.max_position_embeddings
            self.vocab_size = gguf.config.vocab_size
        else:
            self.tokenizer = load_tokenizer(self.model_dir)
            config = json.loads((self.model_dir / "config.json").read_text())
            self.max_model_len = int(config.get("max_position_embeddings", 2048))
            self.vocab_size = int(config.get("vocab_size", len(self.tokenizer)))
        template = getattr(self.tokenizer, "chat_template", None)
        self.has_chat_template = bool(template)
        # A template that mentions tools renders them (and calls, and results) itself; for one that
        # does not, like SmolLM2's, `tool_calls.render_turns` writes them as text turns.
        self.template_takes_tools = isinstance(template, str) and re.search(r"\btools\b", template) is not None
        # What the detokenizer decodes with: the Rust tokenizer itself, without transformers'
        # per-call Python wrapping (about 4 us a call instead of 15 here), which gives the same
        # text unless the wrapper cleans up spaces on top (then the wrapper it is).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        cleans_up = getattr(self.tokenizer, "clean_up_tokenization_spaces", False)
        self.decoder: Decoder = backend if backend is not None and not cleans_up else self.tokenizer

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> str:
        """Renders (role, content) turns with the model's template, ending with the assistant cue."""
        turns = [{"role": role, "content": content} for role, content in messages]
        return self.tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)

    def render_conversation(self, messages: Sequence[ChatMessage], tools: Sequence[FunctionTool] = ()) -> str:
        """Renders chat messages, with tool calls and results, and the tools on offer."""
        if self.template_takes_tools:
            return self.tokenizer.apply_chat_template(
                template_messages(messages), tools=template_tools(tools) or None, tokenize=False,
                add_generation_prompt=True)
        return self.render_chat(render_turns(messages, tools))

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
