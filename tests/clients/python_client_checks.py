"""Uses the installed `switchyard_client` the way an application would; run by a FRESH virtualenv's
python that has only the wheel and its pinned dependencies (tests/clients/test_python_client.py).

`python python_client_checks.py SCENARIO ARGS_JSON` prints one JSON object with what it saw; the test
asserts on it. Nothing from the repository is importable here, on purpose.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

import switchyard_client as sc
from switchyard_client.proto import generation_pb2 as pb
from switchyard_client.proto import generation_pb2_grpc

FAST_RETRY = sc.RetryPolicy(max_attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


def summarize(chunks: list[sc.GenerateChunk]) -> dict[str, Any]:
    last = chunks[-1]
    return {"text": "".join(c.text for c in chunks), "token_ids": [t for c in chunks for t in c.token_ids],
            "num_chunks": len(chunks), "finish_reason": last.finish_reason,
            "usage": None if last.usage is None else [last.usage.prompt_tokens, last.usage.completion_tokens,
                                                      last.usage.cached_tokens],
            "usage_only_on_last": all(c.usage is None for c in chunks[:-1])}


def error(e: sc.SwitchyardError) -> dict[str, Any]:
    return {"type": type(e).__name__, "code": e.code.name, "field": e.field, "details": e.details,
            "retry_after_s": getattr(e, "retry_after_s", None), "is_switchyard_error": isinstance(e, sc.SwitchyardError)}


def expect_error(fn: Any) -> dict[str, Any]:
    try:
        fn()
    except sc.SwitchyardError as e:
        return error(e)
    return {"type": None}


def scenario_sync(address: str, api_key: str, prompt: str) -> dict[str, Any]:
    with sc.Client(address, api_key=api_key) as client:
        chunks = list(client.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True))
        ids = client.tokenize(prompt, add_special_tokens=True)
        chat = list(client.chat([sc.ChatMessage("system", "Be brief."), {"role": "user", "content": prompt}],
                                max_tokens=8, temperature=0, ignore_eos=True))
        chat_ids = client.tokenize(messages=[{"role": "user", "content": prompt}])
        info = client.model_info()
        # Leaving the loop after the first chunk cancels the call (the server frees the request).
        for first in client.generate(prompt, max_tokens=500, ignore_eos=True):
            break
        return {"generate": summarize(chunks), "prompt_ids": ids, "chat": summarize(chat), "chat_prompt_ids": chat_ids,
                "model_info": [info.model, info.max_model_len, info.vocab_size, info.version],
                "early_break_tokens": len(first.token_ids),
                "service_config": json.loads(dict(client._options)["grpc.service_config"]),
                "enable_retries": dict(client._options)["grpc.enable_retries"]}


def scenario_async(address: str, api_key: str, prompt: str) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with sc.AsyncClient(address, api_key=api_key) as client:
            async def one(p: str) -> dict[str, Any]:
                return summarize([c async for c in client.generate(p, max_tokens=12, temperature=0, ignore_eos=True)])
            together = await asyncio.gather(one(prompt), one(prompt + " again"))
            chat = [c async for c in client.chat([{"role": "user", "content": prompt}], max_tokens=8, temperature=0,
                                                 ignore_eos=True)]
            info = await client.model_info()
            try:
                await client.tokenize(prompt="x", timeout=-1)
            except sc.DeadlineExceeded as e:
                deadline = error(e)
            else:
                deadline = {"type": None}
            return {"generate": together[0], "generate_2": together[1], "chat": summarize(chat),
                    "prompt_ids": await client.tokenize(prompt, add_special_tokens=True), "model_info": [info.model, info.vocab_size],
                    "deadline": deadline}
    return asyncio.run(main())


def scenario_errors(address: str, api_key: str, prompt: str) -> dict[str, Any]:
    with sc.Client(address, api_key=api_key) as client, sc.Client(address) as keyless, \
            sc.Client(address, api_key="sk-wrong-0000000000") as wrong:
        out = {
            "top_p": expect_error(lambda: list(client.generate(prompt, top_p=1.5))),
            "empty_prompt": expect_error(lambda: list(client.generate(""))),
            "bad_token_id": expect_error(lambda: list(client.generate([1, 10 ** 8], max_tokens=2))),
            "no_key": expect_error(lambda: client.model_info() and keyless.model_info()),
            "wrong_key": expect_error(lambda: list(wrong.generate(prompt, max_tokens=2))),
            "deadline": expect_error(lambda: list(client.generate(prompt, max_tokens=2000, ignore_eos=True,
                                                                  timeout=0.3))),
        }
    with sc.Client("127.0.0.1:1", retry=FAST_RETRY, timeout=5) as nobody:
        out["nobody_listening"] = expect_error(nobody.model_info)
    return out


class FakeGeneration(generation_pb2_grpc.GenerationServicer):
    """A stand-in front door whose failures are scripted, to watch gRPC's retry policy at work: it counts
    the attempts each call makes and records the authorization metadata it was sent."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.authorization: list[str | None] = []
        self.lock = threading.Lock()

    def _count(self, name: str, context: grpc.ServicerContext) -> int:
        with self.lock:
            self.attempts[name] = self.attempts.get(name, 0) + 1
            self.authorization.append(dict(context.invocation_metadata()).get("authorization"))
            return self.attempts[name]

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):  # noqa: N802
        attempt = self._count(request.prompt, context)
        if request.prompt == "unavailable twice" and attempt <= 2:
            context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler restarting")
        if request.prompt == "fails after first token":
            yield pb.GenerateResponse(text="a", token_ids=[7])
            context.abort(grpc.StatusCode.UNAVAILABLE, "worker lost")
        yield pb.GenerateResponse(text="ok", token_ids=[1, 2])
        yield pb.GenerateResponse(text="!", token_ids=[3], finish_reason=pb.FINISH_REASON_STOP,
                                  usage=pb.Usage(prompt_tokens=2, completion_tokens=3))

    def Tokenize(self, request: pb.TokenizeRequest, context: grpc.ServicerContext) -> pb.TokenizeResponse:  # noqa: N802
        self._count("tokenize:" + request.prompt, context)
        context.set_trailing_metadata((("retry-after-ms", "1500"), ("switchyard-field", "request")))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")

    def GetModelInfo(self, request: pb.GetModelInfoRequest, context: grpc.ServicerContext) -> pb.ModelInfo:  # noqa: N802
        self._count("model_info", context)
        return pb.ModelInfo(model="fake", max_model_len=64, vocab_size=10, version="v0")


def fake_server(tls: dict[str, str] | None) -> tuple[grpc.Server, FakeGeneration, int]:
    servicer = FakeGeneration()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    if tls:
        with open(tls["key_file"], "rb") as k, open(tls["cert_file"], "rb") as c, open(tls["ca_file"], "rb") as ca:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())], root_certificates=ca.read(),
                                                require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, port


def scenario_retry() -> dict[str, Any]:
    server, fake, port = fake_server(None)
    address = f"127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        with sc.Client(address, api_key="sk-local-12345678", retry=FAST_RETRY) as client:
            out["retried"] = summarize(list(client.generate("unavailable twice")))
            out["exhausted"] = expect_error(lambda: client.tokenize("busy"))
            chunks: list[sc.GenerateChunk] = []

            def after_first() -> None:
                for chunk in client.generate("fails after first token"):
                    chunks.append(chunk)
            out["after_first"] = expect_error(after_first)
            out["after_first_chunks"] = len(chunks)
        with sc.Client(address, retry=None) as no_retry:
            out["no_retry"] = expect_error(lambda: no_retry.tokenize("once"))
        out["attempts"] = fake.attempts
        out["authorization"] = sorted({a or "" for a in fake.authorization})
    finally:
        server.stop(None)
    return out


def scenario_tls(tls: dict[str, str]) -> dict[str, Any]:
    server, fake, port = fake_server(tls)
    out: dict[str, Any] = {}
    try:
        mutual = sc.Tls(ca_file=tls["ca_file"], cert_file=tls["cert_file"], key_file=tls["key_file"])
        with sc.Client(f"localhost:{port}", api_key="sk-tls-12345678", tls=mutual) as client:
            out["model_info"] = client.model_info().model
        with sc.Client(f"localhost:{port}", tls=sc.Tls(ca_file=tls["ca_file"]), timeout=5, retry=None) as anonymous:
            out["no_client_cert"] = expect_error(anonymous.model_info)
        with sc.Client(f"localhost:{port}", insecure=True, timeout=5, retry=None) as plaintext:
            out["plaintext"] = expect_error(plaintext.model_info)
        out["authorization"] = fake.authorization
    finally:
        server.stop(None)
    return out


def main() -> None:
    scenario, args = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    result = globals()[f"scenario_{scenario}"](**args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
