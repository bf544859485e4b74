"""End to end on the real default model (SmolLM2-135M-Instruct, float32): answers, not mechanics.

The stack runs as separate processes the way `make up` starts it. Greedy chat replies must equal
Hugging Face `generate` token for token, stopping at the end-of-turn token the way HF stops; and a
handful of factual questions must be answered correctly at temperature 0.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import grpc
import openai
import pytest
from switchyard.api.v1 import generation_pb2 as pb
from switchyard.api.v1 import generation_pb2_grpc

from deploy.stack import start_stack, stop_stack
from tests.conftest import REPO_ROOT
from tests.deploy.test_stack import make_config
from tests.reference import assert_greedy_matches, hf_greedy

pytestmark = pytest.mark.e2e

MAX_TOKENS = 40
EOS_ID = 2  # <|im_end|>, the model's end of turn (generation_config.json)

CHATS: list[list[tuple[str, str]]] = [
    [("user", "What is the capital of France?")],
    [("user", "Write a haiku about the sea.")],
    [("user", "Explain what a CPU cache is in one sentence.")],
    [("system", "You are a pirate. Answer like one."), ("user", "How are you today?")],
    [("user", "List three fruits.")],
    [("user", "Translate 'good morning' into French.")],
    [("user", "What is 12 times 12?")],
    [("user", "Hi!"), ("assistant", "Hello! How can I help you today?"), ("user", "Tell me a fun fact.")],
    [("user", "Give me a Python function that adds two numbers.")],
    [("user", "Où se trouve la tour Eiffel ?")],
    [("system", "Answer in one word."), ("user", "What colour is grass?")],
    [("user", "Why do leaves change colour in autumn?")],
]

# Question -> a word the correct answer contains (each answered correctly by this model, greedy).
FACTS = {
    "What is the capital of France?": "Paris",
    "What is the capital of Japan?": "Tokyo",
    "What is the capital of Germany?": "Berlin",
    "What is the chemical symbol for water?": "H2O",
    "What is 2 + 2?": "4",
    "What is the opposite of hot?": "cold",
}


@pytest.fixture(scope="module")
def stack(smollm2_model_dir, tmp_path_factory):
    config = make_config(tmp_path_factory.mktemp("run"), smollm2_model_dir,
                         services=("worker", "scheduler", "tokenizer"), timeout_s=120.0,
                         # The KV pool sized as `make up` sizes it (from the memory budget).
                         worker_args=("--num-threads", "1"))
    running = start_stack(config)
    try:
        yield running
    finally:
        stop_stack(config.run_dir, quiet=True)


def chat_request(turns: list[tuple[str, str]], **sampling) -> pb.GenerateRequest:
    request = pb.GenerateRequest(sampling=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, **sampling))
    for role, content in turns:
        request.messages.messages.add(role=role, content=content)
    return request


async def test_greedy_chat_equals_hf_generate_and_stops_at_end_of_turn(stack, smollm2_model_dir) -> None:
    async with grpc.aio.insecure_channel(stack.tokenizer_address) as channel:
        api = generation_pb2_grpc.GenerationStub(channel)

        async def one(turns):
            prompt = await api.Tokenize(pb.TokenizeRequest(messages=chat_request(turns).messages,
                                                           add_special_tokens=True), timeout=30)
            responses = [r async for r in api.Generate(chat_request(turns), timeout=300)]
            return list(prompt.token_ids), [t for r in responses for t in r.token_ids], responses[-1]

        # All at once: the replies share batches on the workers, as real traffic does.
        results = await asyncio.gather(*(one(turns) for turns in CHATS))
    compared = num_stopped = 0
    for turns, (prompt_ids, token_ids, last) in zip(CHATS, results):
        ref = hf_greedy(smollm2_model_dir, prompt_ids, MAX_TOKENS, eos_token_ids=[EOS_ID])
        label = turns[-1][1]
        compared += assert_greedy_matches(ref, token_ids, label)
        if ref.comparable_prefix() == len(ref.token_ids):  # no near-tie: the whole reply must agree
            assert token_ids == ref.token_ids, label
            stopped = ref.token_ids[-1] == EOS_ID
            assert last.finish_reason == (pb.FINISH_REASON_STOP if stopped else pb.FINISH_REASON_LENGTH), label
            num_stopped += stopped
        assert last.usage.prompt_tokens == len(prompt_ids) and last.usage.completion_tokens == len(token_ids)
    assert compared >= 0.8 * sum(min(MAX_TOKENS, 20) for _ in CHATS), f"compared only {compared} tokens"
    assert num_stopped >= 3, "too few replies ended at end of turn to test stopping"


async def test_factual_questions_are_answered_correctly(stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0)
    model = (await client.models.list()).data[0].id
    assert model == "smollm2-135m-instruct"

    async def ask(question: str) -> str:
        # The first question sets no max_tokens, as most chat clients do: the default is "up to the
        # whole context", which the worker's KV pool must be able to hold.
        limit = {} if question == next(iter(FACTS)) else {"max_tokens": 32}
        reply = await client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, **limit)
        return reply.choices[0].message.content

    answers = await asyncio.gather(*(ask(question) for question in FACTS))
    wrong = {q: a for (q, want), a in zip(FACTS.items(), answers) if want.lower() not in a.lower()}
    assert not wrong, f"wrong answers: {wrong}"
    assert "<|im_end|>" not in "".join(answers)
    await client.close()


def test_the_demo_that_make_run_ends_with_answers_its_question(stack) -> None:
    demo = subprocess.run([sys.executable, "-m", "deploy.demo", "--address", stack.tokenizer_address],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    question, _, rest = demo.stdout.partition("\nassistant: ")
    assert question == "user: What is the capital of France?", demo.stdout
    assert "Paris" in rest and "finish_reason=stop" in rest, demo.stdout
