"""A Hugging Face fast tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

GGUF keeps the vocabulary, the BPE merges, each token's type and the name of the pre-tokenizer
(`tokenizer.ggml.pre`, llama.cpp's name for the regex that splits text before BPE). We rebuild the
same pipeline with the `tokenizers` library: the split is what decides how digits and spaces become
tokens, so each supported pre-tokenizer maps to the regexes llama.cpp uses for it. Building it
directly takes well under a second (transformers' generic GGUF converter takes ~10 s here and
drops the digit split of SmolLM-style tokenizers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from shared.gguf_model import GgufError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

    from shared.gguf_model import GgufModel

# llama.cpp token types (llama_token_type): 3 is a control token (<|im_end|>), 4 user-defined.
_CONTROL, _USER_DEFINED = 3, 4

# Each digit alone, then GPT-2's split: SmolLM, StarCoder and their relatives.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva")
_GPT2 = ("default", "gpt2", "gpt-2")
_LLAMA3 = ("llama-bpe", "llama3", "smaug-bpe")
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE_TOKENIZERS = _DIGITS_THEN_GPT2 + _GPT2 + _LLAMA3


def _pre_tokenizer(model: GgufModel, pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2:
        return byte_level
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise GgufError(model.path, f"tokenizer pre-tokenizer {pre!r} is not supported "
                                f"(supported: {', '.join(SUPPORTED_PRE_TOKENIZERS)})")


def build_tokenizer(model: GgufModel) -> PreTrainedTokenizerFast:
    """The file's tokenizer with its special tokens and chat template, ready for `encode`."""
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 (slow import)

    kind = model.field("tokenizer.ggml.model", None)
    if kind != "gpt2":
        raise GgufError(model.path, f"tokenizer model {kind!r} is not supported (supported: 'gpt2', "
                                    "byte-level BPE as in SmolLM, Llama 3 and GPT-2)")
    tokens = [str(t) for t in model.field("tokenizer.ggml.tokens")]
    merges = [tuple(str(m).split(" ", 1)) for m in model.field("tokenizer.ggml.merges")]
    token_types = list(model.field("tokenizer.ggml.token_type", [1] * len(tokens)))
    pre = str(model.field("tokenizer.ggml.pre", "default"))
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3))
    tokenizer.pre_tokenizer = _pre_tokenizer(model, pre)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(tokens[i], special=kind_ == _CONTROL, normalized=False)
                          for i, kind_ in enumerate(token_types) if kind_ in (_CONTROL, _USER_DEFINED)])

    def token(key: str) -> str | None:
        token_id = model.field(key, None)
        return tokens[int(token_id)] if token_id is not None and 0 <= int(token_id) < len(tokens) else None

    bos = token("tokenizer.ggml.bos_token_id")
    if bool(model.field("tokenizer.ggml.add_bos_token", False)) and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    eos_ids = model.config.eos_token_ids
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=tokens[eos_ids[0]] if eos_ids else None,
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        chat_template=model.chat_template,
        # The default cleanup rewrites " ." to "." and would break the exact round trip.
        clean_up_tokenization_spaces=False,
        model_max_length=model.config.max_position_embeddings,
    )
