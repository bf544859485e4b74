"""`python bench/structured_output_libs.py [--reps N] [--out FILE]`: what a token mask costs in each
structured-output library, on this machine and this model's vocabulary.

Issue 20 asked to pick the library (xgrammar, llguidance or outlines-core) by measuring the
per-token mask cost here. For each library importable in the running interpreter (a missing one
is recorded as skipped, with the import error), and for each of six JSON schemas of the shapes
applications send (flat object, nested objects, array of objects with bounds, enums, numbers with
bounds, anyOf), it
- compiles the schema against SmolLM2's vocabulary (`models/smollm2-135m-instruct/tokenizer.json`)
  and times it (median of --compile-reps, each from scratch, caches off where the library has one);
- drives a fresh matcher along a valid instance of the schema, `--reps` times: the instance is
  written as compact JSON, tokenized with the model's tokenizer, and EOS appended; at each token
  the full next-token mask is computed into a packed int32 bitmask (what every library writes and
  what a worker would apply), then the token is consumed. The mask times give mean, p50, p99
  and max per token; the first mask of a walk is also kept apart, since lazy compilers pay there.
Every library is configured for compact JSON (no free whitespace), as the front door asks of
llguidance (services/tokenizer/structured_output.py), and single-threaded compilation, since a
worker shares its cores with the model. The results also hold the CPU's features (flags from
/proc/cpuinfo) and each library's version.

The project's venv has llguidance only; to measure all three in one run, use a throwaway venv
outside the repository (plain `python3 -m venv`, then `torch==2.13.0`, the pinned libraries,
`tokenizers` and `transformers`; "how_to_run" in the results file has the commands). Writes
bench/results/structured_output_libs.json (or --out), with a "summary" that a person writes after
reading the numbers (--summary-file, a text file; kept from the previous results file otherwise).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = REPO_ROOT / "models" / "smollm2-135m-instruct"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "structured_output_libs.json"
EOS_TOKEN_ID = 2  # SmolLM2-Instruct's end of turn (generation_config.eos_token_id)
CPU_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _obj(properties: dict[str, Any]) -> dict[str, Any]:
    """An object schema as OpenAI's strict mode writes them: every property required, no others."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


_STR = {"type": "string"}
# (name, schema, a valid instance with its keys in schema order)
SCHEMAS: tuple[tuple[str, dict[str, Any], Any], ...] = (
    ("flat_object",
     _obj({"name": _STR, "age": {"type": "integer"}, "email": _STR, "active": {"type": "boolean"}}),
     {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "active": True}),
    ("nested_objects",
     _obj({"order_id": _STR,
           "customer": _obj({"name": _STR, "address": _obj({"street": _STR, "city": _STR, "postcode": _STR})}),
           "total": {"type": "number"}}),
     {"order_id": "A-1042", "customer": {"name": "Grace Hopper", "address": {
         "street": "12 Harbour Road", "city": "Arlington", "postcode": "22201"}}, "total": 149.95}),
    ("array_of_objects_bounded",
     _obj({"items": {"type": "array", "minItems": 1, "maxItems": 5,
                     "items": _obj({"sku": {"type": "string", "maxLength": 12},
                                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99}})}}),
     {"items": [{"sku": "KB-201", "quantity": 2}, {"sku": "MS-88", "quantity": 1},
                {"sku": "USB-C-1M", "quantity": 12}]}),
    ("enums",
     _obj({"status": {"enum": ["open", "in_progress", "blocked", "done"]},
           "priority": {"enum": ["low", "medium", "high", "urgent"]},
           "category": {"enum": ["bug", "feature", "question", "documentation", "performance"]},
           "kind": {"const": "ticket"}}),
     {"status": "in_progress", "priority": "high", "category": "performance", "kind": "ticket"}),
    ("numbers_bounded",
     _obj({"latitude": {"type": "number", "minimum": -90, "maximum": 90},
           "longitude": {"type": "number", "minimum": -180, "maximum": 180},
           "elevation_m": {"type": "integer", "minimum": 0, "maximum": 9000},
           "temperature_c": {"type": "number", "minimum": -90, "maximum": 60}}),
     {"latitude": 47.3769, "longitude": 8.5417, "elevation_m": 408, "temperature_c": -3.5}),
    ("any_of",
     _obj({"contact": {"anyOf": [_obj({"email": _STR}), _obj({"phone": _STR, "country_code": {"type": "integer"}})]},
           "value": {"anyOf": [_STR, {"type": "integer"}, {"type": "null"}]},
           "tags": {"type": "array", "items": {"anyOf": [_STR, {"type": "number"}]}}}),
     {"contact": {"phone": "555-0142", "country_code": 44}, "value": None, "tags": ["urgent", 3, "vip"]}),
)


def cpu_features() -> dict[str, Any]:
    flags: set[str] = set()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"model": model or platform.processor(), **{f: f in flags for f in CPU_FLAGS}}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _stats_us(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    p99 = us[min(len(us) - 1, round(0.99 * (len(us) - 1)))]
    return {"mean_us": round(statistics.fmean(us), 2), "p50_us": round(statistics.median(us), 2),
            "p99_us": round(p99, 2), "max_us": round(us[-1], 2), "num_samples": len(us)}


class Library:
    """One library behind three calls: compile a schema, make a matcher, mask and consume."""

    name = ""
    dist = ""
    modules: tuple[str, ...] = ()  # imported before the clock starts: setup times the vocabulary alone

    def setup(self, tokenizer_json: Path, vocab_size: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def walk(self, compiled: Any, token_ids: list[int]) -> list[float]: ...


class LLGuidance(Library):
    name, dist = "llguidance", "llguidance"
    modules = ("llguidance", "llguidance.torch")

    def setup(self, tokenizer_json: Path, vocab_size: int) -> None:
        import llguidance  # noqa: PLC0415
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask  # noqa: PLC0415

        self.llg, self.fill = llguidance, fill_next_token_bitmask
        self.tokenizer = llguidance.LLTokenizer(str(tokenizer_json), eos_token=[EOS_TOKEN_ID])
        self.bitmask = allocate_token_bitmask(1, vocab_size)

    def compile(self, schema: dict[str, Any]) -> Any:
        # What the front door and the worker do: schema -> grammar text -> matcher bound to the
        # vocabulary. llguidance builds its lexer lazily, so part of the work lands on the first mask.
        grammar = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
        matcher = self.llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return grammar

    def walk(self, compiled: Any, token_ids: list[int]) -> list[float]:
        matcher = self.llg.LLMatcher(self.tokenizer, compiled, log_level=0)
        times = []
        for t in token_ids:
            t0 = time.perf_counter()
            self.fill(matcher, self.bitmask, 0)
            times.append(time.perf_counter() - t0)
            if not _allowed(self.bitmask, t) or not matcher.consume_token(t):
                raise ValueError(f"token {t} refused: {matcher.get_error()}")
        return times


class XGrammar(Library):
    name, dist = "xgrammar", "xgrammar"
    modules = ("xgrammar", "transformers")

    def setup(self, tokenizer_json: Path, vocab_size: int) -> None:
        import xgrammar  # noqa: PLC0415
        from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json))
        info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size, stop_token_ids=[EOS_TOKEN_ID])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(",", ":"))

    def walk(self, compiled: Any, token_ids: list[int]) -> list[float]:
        matcher = self.xgr.GrammarMatcher(compiled)
        times = []
        for t in token_ids:
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(self.bitmask, 0)
            times.append(time.perf_counter() - t0)
            if not _allowed(self.bitmask, t) or not matcher.accept_token(t):
                raise ValueError(f"token {t} refused")
        return times


class OutlinesCore(Library):
    name, dist = "outlines_core", "outlines-core"
    modules = ("outlines_core", "outlines_core.json_schema", "torch")

    def setup(self, tokenizer_json: Path, vocab_size: int) -> None:
        import outlines_core  # noqa: PLC0415
        from outlines_core.json_schema import build_regex_from_schema  # noqa: PLC0415

        self.oc, self.to_regex = outlines_core, build_regex_from_schema
        # Vocabulary.from_pretrained would fetch from a hub; the map is built from tokenizer.json:
        # byte-level BPE tokens decoded to their bytes, special tokens (and EOS) left out.
        data = json.loads(tokenizer_json.read_text())
        special = {t["id"] for t in data.get("added_tokens", []) if t.get("special")}
        to_byte = _byte_decoder()
        tokens: dict[bytes, list[int]] = {}
        for token, i in data["model"]["vocab"].items():
            if i not in special and i != EOS_TOKEN_ID:
                tokens.setdefault(bytes(to_byte[c] for c in token), []).append(i)
        self.vocabulary = outlines_core.Vocabulary(EOS_TOKEN_ID, tokens)
        import torch  # noqa: PLC0415

        self.bitmask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)

    def compile(self, schema: dict[str, Any]) -> Any:
        # Compact JSON: no whitespace between tokens (the default pattern allows some).
        regex = self.to_regex(json.dumps(schema), whitespace_pattern="")
        return self.oc.Index(regex, self.vocabulary)

    def walk(self, compiled: Any, token_ids: list[int]) -> list[float]:
        guide = self.oc.Guide(compiled)
        ptr, numel, size = self.bitmask.data_ptr(), self.bitmask.numel(), self.bitmask.element_size()
        times = []
        for n, t in enumerate(token_ids):
            t0 = time.perf_counter()
            guide.write_mask_into(ptr, numel, size)
            times.append(time.perf_counter() - t0)
            if not _allowed(self.bitmask, t):
                raise ValueError(f"token {t} refused")
            if n + 1 < len(token_ids):  # EOS ends the walk; the guide has no state past it
                guide.advance(t, return_tokens=False)
        return times


LIBRARIES: tuple[type[Library], ...] = (LLGuidance, XGrammar, OutlinesCore)


def _allowed(bitmask: Any, token_id: int) -> bool:
    return bool((int(bitmask[0, token_id // 32]) >> (token_id % 32)) & 1)


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, reversed: how byte-level BPE writes bytes as characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _timed(call: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = call()
    return out, time.perf_counter() - t0


def measure(lib: Library, reps: int, compile_reps: int, encode: Callable[[str], list[int]]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    all_masks: list[float] = []
    for name, schema, instance in SCHEMAS:
        text = json.dumps(instance, separators=(",", ":"))
        token_ids = encode(text) + [EOS_TOKEN_ID]
        try:
            compile_times = []
            for _ in range(compile_reps):
                compiled, seconds = _timed(lambda: lib.compile(schema))
                compile_times.append(seconds)
            walks = [lib.walk(compiled, token_ids) for _ in range(reps)]
        except Exception as e:  # noqa: BLE001 - one schema a library cannot do is a finding
            results[name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"  {lib.name} {name}: ERROR {type(e).__name__}: {e}", flush=True)
            continue
        masks = [s for w in walks for s in w]
        all_masks += masks
        results[name] = {"num_tokens": len(token_ids), "compile_ms": round(statistics.median(compile_times) * 1e3, 3),
                         "compile_ms_all": [round(s * 1e3, 3) for s in compile_times],
                         "first_mask_us": round(statistics.median(w[0] for w in walks) * 1e6, 2),
                         "mask": _stats_us(masks)}
        m = results[name]["mask"]
        print(f"  {lib.name:<14} {name:<26} compile {results[name]['compile_ms']:9.2f} ms   mask mean "
              f"{m['mean_us']:8.1f} us  p50 {m['p50_us']:8.1f}  p99 {m['p99_us']:8.1f}  ({len(token_ids)} tokens)",
              flush=True)
    if all_masks:
        results["all_schemas"] = {"mask": _stats_us(all_masks)}
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="walks along each instance, each with a fresh matcher")
    p.add_argument("--compile-reps", type=int, default=3, help="compilations of each schema (median reported)")
    p.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--summary-file", type=Path, help="text for the results' summary (default: keep the old one)")
    p.add_argument("--dependency-weight", type=Path,
                   help="JSON of what installing each library pulled in (measured outside this script)")
    args = p.parse_args(argv)
    tokenizer_json = args.model_dir / "tokenizer.json"
    vocab_size = json.loads((args.model_dir / "config.json").read_text())["vocab_size"]
    from tokenizers import Tokenizer  # noqa: PLC0415

    hf = Tokenizer.from_file(str(tokenizer_json))

    def encode(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    libraries: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for cls in LIBRARIES:
        lib = cls()
        try:
            for module in lib.modules:
                importlib.import_module(module)
        except ImportError as e:
            skipped[lib.name] = f"not importable here: {e}"
            print(f"  {lib.name}: skipped, not importable ({e})", flush=True)
            continue
        _, setup_s = _timed(lambda: lib.setup(tokenizer_json, vocab_size))
        print(f"  {lib.name} {_version(lib.dist)}: vocabulary set up in {setup_s * 1e3:.0f} ms", flush=True)
        libraries[lib.name] = {"version": _version(lib.dist), "vocabulary_setup_ms": round(setup_s * 1e3, 1),
                               "schemas": measure(lib, args.reps, args.compile_reps, encode)}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    summary = args.summary_file.read_text().strip() if args.summary_file else previous.get("summary", "")
    weight = json.loads(args.dependency_weight.read_text()) if args.dependency_weight else previous.get(
        "dependency_weight")
    results = {
        "summary": summary,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "how_to_run": "python3 -m venv /tmp/libvenv; /tmp/libvenv/bin/pip install torch==2.13.0 llguidance==1.9.1 "
                      "xgrammar==0.2.8 outlines-core==0.2.14 tokenizers transformers==5.23.0; "
                      "/tmp/libvenv/bin/python bench/structured_output_libs.py (a library the interpreter lacks is "
                      "skipped); --reps walks per schema, --compile-reps compilations per schema",
        "config": {"model": args.model_dir.name, "vocab_size": vocab_size, "reps": args.reps,
                   "compile_reps": args.compile_reps, "compact_json": True, "compile_threads": 1,
                   "schemas": {name: schema for name, schema, _ in SCHEMAS}},
        "machine": {"cpu": cpu_features(), "python": platform.python_version(), "torch": _version("torch"),
                    "tokenizers": _version("tokenizers"), "transformers": _version("transformers")},
        "dependency_weight": weight,
        "libraries": libraries,
        "skipped": skipped,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
