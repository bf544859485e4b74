"""`python -m deploy.demo [QUESTION...]` (what `make run` ends with): stream one chat answer from the stack.

It is what a backend service does: call `switchyard.api.v1.Generation/Generate` through the generated
stubs and print each text delta the moment it arrives, then the usage of the finished request. The
question goes as a chat message (rendered with the model's chat template); `--raw` sends it as a
plain completion prompt instead.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from switchyard.api.v1 import generation_pb2, generation_pb2_grpc

from shared.config import ConfigError, env_int, env_str

DEFAULT_PROMPT = "What is the capital of France?"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    default_address = f"127.0.0.1:{env_int('SWITCHYARD_TOKENIZER_PORT', 50051, min_value=1)}"
    p = argparse.ArgumentParser(prog="python -m deploy.demo", description=__doc__.splitlines()[0])
    p.add_argument("prompt", nargs="*", help=f"the question (default {DEFAULT_PROMPT!r})")
    p.add_argument("--address", default=env_str("SWITCHYARD_TOKENIZER_ADDRESS", default_address),
                   help="tokenizer gRPC host:port [SWITCHYARD_TOKENIZER_ADDRESS]")
    p.add_argument("--raw", action="store_true", help="send a plain completion prompt, not a chat message")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--timeout-s", type=float, default=120.0)
    return p.parse_args(argv)


def make_request(prompt: str, raw: bool, max_tokens: int, temperature: float) -> generation_pb2.GenerateRequest:
    sampling = generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=temperature)
    if raw:
        return generation_pb2.GenerateRequest(prompt=prompt, sampling=sampling)
    request = generation_pb2.GenerateRequest(sampling=sampling)
    request.messages.messages.add(role="user", content=prompt)
    return request


def stream(address: str, request: generation_pb2.GenerateRequest, timeout_s: float) -> None:
    last = None
    with grpc.insecure_channel(address) as channel:
        if request.HasField("messages"):
            print(f"user: {request.messages.messages[0].content}\nassistant: ", end="", flush=True)
        else:
            print(request.prompt, end="", flush=True)
        for response in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout_s):
            print(response.text, end="", flush=True)
            last = response
    print()
    if last is not None and last.HasField("usage"):
        reason = generation_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        u = last.usage
        print(f"[finish_reason={reason} prompt_tokens={u.prompt_tokens} completion_tokens={u.completion_tokens} "
              f"cached_tokens={u.cached_tokens}]")


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    request = make_request(" ".join(args.prompt) or DEFAULT_PROMPT, args.raw, args.max_tokens, args.temperature)
    try:
        stream(args.address, request, args.timeout_s)
    except grpc.RpcError as e:
        print(f"\ndemo: {args.address}: {e.code().name}: {e.details()} (is the stack up? `make up`)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
