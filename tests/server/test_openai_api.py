"""The official `openai` client against a real server: every adapter kind, streaming or not,
equals the offline engine; 64 concurrent streams over 16 adapters; usage and finish reasons."""

from __future__ import annotations

import asyncio

import openai
import pytest

from loraplex.model.sampler import SamplingParams
from tests.adapter_factory import AdapterSpec, make_peft_adapter
from tests.server.conftest import ADAPTER_SPECS, MODEL_NAME

MODELS = [MODEL_NAME, *ADAPTER_SPECS]
PROMPT = "Write one line about page tables."
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name a prime number."}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def offline_text(offline, prompt, model: str, max_tokens: int, **params) -> tuple[str, int]:
    adapter = None if model == MODEL_NAME else model
    [out] = offline.generate([prompt], SamplingParams(max_tokens=max_tokens, **params), [adapter])
    return out.text, len(out.token_ids)


@pytest.mark.parametrize("model", MODELS)
def test_completions_equal_offline_engine(server, offline, model):
    c = client(server)
    expected, num_tokens = offline_text(offline, PROMPT, model, 12, temperature=0)
    resp = c.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert resp.choices[0].text == expected
    assert resp.usage.completion_tokens == num_tokens
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert resp.choices[0].finish_reason == ("length" if num_tokens == 12 else "stop")
    chunks = list(c.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage.completion_tokens == num_tokens
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == \
        resp.choices[0].finish_reason


@pytest.mark.parametrize("model", MODELS)
def test_chat_equals_offline_engine(server, offline, model):
    c = client(server)
    prompt_ids = offline.tokenizer.apply_chat_template(MESSAGES)
    expected, _ = offline_text(offline, prompt_ids, model, 10, temperature=0)
    resp = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                     temperature=0)
    assert resp.choices[0].message.content == expected
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == len(prompt_ids)
    stream = c.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10,
                                       temperature=0, stream=True)
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text == expected


def test_seeded_sampling_n_and_logprobs(server, offline):
    c = client(server)
    kwargs = dict(model="dora8", prompt=[PROMPT, "Another prompt"], max_tokens=8,
                  temperature=0.9, top_p=0.95, seed=11, n=2, logprobs=3,
                  extra_body={"top_k": 40})
    first = c.completions.create(**kwargs)
    again = c.completions.create(**kwargs)
    assert [ch.text for ch in first.choices] == [ch.text for ch in again.choices]
    assert [ch.index for ch in first.choices] == [0, 1, 2, 3]
    # choice j of each prompt runs with seed + j, exactly like the offline engine
    for ch in first.choices:
        prompt = kwargs["prompt"][ch.index // 2]
        expected, _ = offline_text(offline, prompt, "dora8", 8, temperature=0.9, top_p=0.95,
                                   top_k=40, seed=11 + ch.index % 2)
        assert ch.text == expected
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(len(top) <= 3 for top in lp.top_logprobs)
        assert all(v <= 0 for v in lp.token_logprobs)


def test_echo_stop_and_chat_logprobs(server, offline):
    c = client(server)
    expected, _ = offline_text(offline, PROMPT, MODEL_NAME, 6, temperature=0)
    resp = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6, temperature=0,
                                echo=True)
    assert resp.choices[0].text == PROMPT + expected
    stop = expected[2:5]
    if stop.strip():
        cut = c.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=6,
                                   temperature=0, stop=[stop])
        assert cut.choices[0].text == expected[: expected.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    chat = c.chat.completions.create(model="lora8", messages=MESSAGES, max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_models_lists_base_and_adapters(server):
    ids = {m.id: m for m in client(server).models.list().data}
    assert MODEL_NAME in ids
    for name in ADAPTER_SPECS:
        assert ids[name].model_extra.get("parent") == MODEL_NAME


def test_64_concurrent_streams_over_16_adapters(server, offline, chat_model, adapter_root):
    model, _ = chat_model
    extra = {}
    for i in range(16 - len(ADAPTER_SPECS)):
        name = f"extra{i}"
        folder = adapter_root / name
        if not folder.exists():
            make_peft_adapter(model, AdapterSpec(kind="lora", r=2 + 3 * i, alpha=8,
                                                 target_modules=("q_proj", "k_proj", "gate_proj"),
                                                 seed=500 + i), folder)
        extra[name] = folder
    for name, folder in extra.items():
        if name not in offline.adapters:
            offline.add_adapter(name, folder)
    names = [*ADAPTER_SPECS, *extra]
    assert len(names) == 16
    jobs = [(names[i % 16], f"Request {i}: tell me about item {i * 7}.", 4 + i % 9)
            for i in range(64)]

    async def one(ac: openai.AsyncOpenAI, model: str, prompt: str, max_tokens: int) -> str:
        stream = await ac.completions.create(model=model, prompt=prompt, max_tokens=max_tokens,
                                             temperature=0, stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        assert finish in ("stop", "length")
        return "".join(parts)

    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused",
                                      max_retries=0) as ac:
            return await asyncio.gather(*(one(ac, *job) for job in jobs))

    texts = asyncio.run(run_all())
    expected = offline.generate([p for _, p, _ in jobs],
                                [SamplingParams(max_tokens=n, temperature=0) for *_, n in jobs],
                                [m for m, _, _ in jobs])
    assert texts == [o.text for o in expected]
