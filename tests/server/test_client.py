"""`loraplex.clients` against a real server on 127.0.0.1: sync and async clients, SSE streams,
adapter admin round trips, error mapping, and the `loraplex` client commands (in-process and as a
subprocess). Oracles: the offline engine and the official `openai` client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import transformers
from loraplex.clients import (
    AdapterFolderError,
    AsyncLoraplexClient,
    LoraplexAPIError,
    LoraplexClient,
    LoraplexConnectionError,
    SSEParser,
    text_of,
)
from loraplex.clients.cli import format_table
from loraplex.model.sampler import SamplingParams
from loraplex.scheduler.engine import Engine
from loraplex.server.cli import main

from tests.server.conftest import MODEL_NAME, Server, free_port, start_server, write_keys

PROMPT = "The capital of France is"
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name three colours."}]
NUM_TOKENS = 10
Capsys = pytest.CaptureFixture[str]
ChatModel = tuple[transformers.PreTrainedModel, Path]
GREEDY = {"max_tokens": NUM_TOKENS, "temperature": 0.0, "ignore_eos": True}


def fresh(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def offline_text(offline: Engine, prompt: str | list[int], adapter: str | None = None) -> str:
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    return offline.generate([prompt], params, [adapter])[0].text


def offline_chat(offline: Engine, messages: list[dict], adapter: str | None = None) -> str:
    return offline_text(offline, offline.tokenizer.apply_chat_template(messages), adapter)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[LoraplexClient]:
    with LoraplexClient(server.url, timeout=60) as c:
        yield c


# ---- generation ------------------------------------------------------------------------------
def test_complete_plain_and_streamed_equal_offline(client: LoraplexClient, offline: Engine) -> None:
    want = offline_text(offline, PROMPT)
    assert want, "the oracle generated nothing: the comparison would prove nothing"
    response = client.complete(PROMPT, **GREEDY)  # model=None: the base model
    assert response["model"] == MODEL_NAME
    assert text_of(response) == want
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == NUM_TOKENS
    chunks = list(client.complete_stream(PROMPT, **GREEDY))
    assert len(chunks) > 1, "a stream of one chunk does not test incremental framing"
    assert "".join(text_of(c) for c in chunks) == want
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" for c in chunks)


def test_adapter_output_differs_and_matches_offline(client: LoraplexClient,
                                                    offline: Engine) -> None:
    want = offline_text(offline, PROMPT, "dora8")
    assert want != offline_text(offline, PROMPT), "the adapter must matter for this test"
    assert text_of(client.complete(PROMPT, model="dora8", **GREEDY)) == want
    streamed = client.complete_stream(PROMPT, model="dora8", **GREEDY)
    assert "".join(text_of(c) for c in streamed) == want


def test_chat_plain_and_streamed_equal_offline_and_openai(server: Server, client: LoraplexClient,
                                                          offline: Engine) -> None:
    want = offline_chat(offline, MESSAGES, "lora8")
    response = client.chat(MESSAGES, model="lora8", **GREEDY)
    assert response["object"] == "chat.completion"
    assert text_of(response) == want
    chunks = list(client.chat_stream(MESSAGES, model="lora8", **GREEDY))
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(text_of(c) for c in chunks) == want
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    theirs = oai.chat.completions.create(model="lora8", messages=MESSAGES,
                                         max_tokens=NUM_TOKENS, temperature=0.0,
                                         extra_body={"ignore_eos": True})
    assert theirs.choices[0].message.content == want
    theirs = oai.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=NUM_TOKENS,
                                    temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in theirs if c.choices) == text_of(
        client.complete(PROMPT, **GREEDY))


def test_stream_stopped_early_frees_the_request(server: Server, client: LoraplexClient) -> None:
    # 1000 tokens take seconds on CPU; only an abort on disconnect frees the request in time.
    stream = client.complete_stream(PROMPT, max_tokens=1000, temperature=0.0, ignore_eos=True)
    next(stream)
    assert server.state.bridge.num_in_flight == 1
    stream.close()  # leaves the `with` of the HTTP stream: the connection closes
    t0 = time.monotonic()
    while server.state.bridge.num_in_flight and time.monotonic() < t0 + 2:
        time.sleep(0.02)
    assert server.state.bridge.num_in_flight == 0


def test_async_client(server: Server, offline: Engine, adapter_root: Path) -> None:
    want_base = offline_text(offline, PROMPT)
    want_chat = offline_chat(offline, MESSAGES)
    name = fresh("async")

    async def scenario() -> None:
        async with AsyncLoraplexClient(server.url, timeout=60) as c:
            assert (await c.health())["status"] == "ok"
            assert (await c.models())["data"][0]["id"] == MODEL_NAME
            texts = await asyncio.gather(*(c.complete(PROMPT, **GREEDY) for _ in range(3)))
            assert [text_of(t) for t in texts] == [want_base] * 3
            assert "".join([text_of(x) async for x in c.complete_stream(PROMPT, **GREEDY)]) \
                == want_base
            assert text_of(await c.chat(MESSAGES, **GREEDY)) == want_chat
            assert "".join([text_of(x) async for x in c.chat_stream(MESSAGES, **GREEDY)]) \
                == want_chat
            card = await c.upload_adapter(name, adapter_root / "lora1")
            assert (card["kind"], card["rank"], card["version"]) == ("lora", 1, 1)
            assert name in [a["id"] for a in await c.list_adapters()]
            card = await c.replace_adapter(name, adapter_root / "rslora16")
            assert (card["rank"], card["version"]) == (16, 2)
            assert (await c.get_adapter(name))["version"] == 2
            assert (await c.delete_adapter(name))["deleted"] is True
            with pytest.raises(LoraplexAPIError) as err:
                await c.get_adapter(name)
            assert err.value.status == 404
            with pytest.raises(LoraplexAPIError) as err:
                async for _ in c.chat_stream(MESSAGES, model=name, **GREEDY):
                    pass
            assert (err.value.status, err.value.type) == (404, "not_found_error")

    asyncio.run(scenario())


# ---- adapter admin ---------------------------------------------------------------------------
def test_upload_replace_delete_round_trip(client: LoraplexClient, offline: Engine,
                                          adapter_root: Path) -> None:
    name = fresh("up")
    card = client.upload_adapter(name, adapter_root / "lora8")
    assert (card["id"], card["kind"], card["rank"], card["version"]) == (name, "lora", 8, 1)
    assert set(card["target_modules"]) == {"q_proj", "v_proj"}
    assert name in [m["id"] for m in client.models()["data"]]
    assert text_of(client.complete(PROMPT, model=name, **GREEDY)) == \
        offline_text(offline, PROMPT, "lora8")
    card = client.replace_adapter(name, adapter_root / "shira4")
    assert (card["kind"], card["version"]) == ("shira", 2)
    assert client.get_adapter(name)["version"] == 2
    assert text_of(client.complete(PROMPT, model=name, **GREEDY)) == \
        offline_text(offline, PROMPT, "shira4")
    assert client.delete_adapter(name) == {"id": name, "object": "adapter", "deleted": True}
    assert name not in [a["id"] for a in client.list_adapters()]
    with pytest.raises(LoraplexAPIError) as err:
        client.complete(PROMPT, model=name, **GREEDY)
    assert err.value.status == 404


def test_register_server_path(client: LoraplexClient, adapter_root: Path) -> None:
    name = fresh("path")
    card = client.register_adapter_path(name, adapter_root / "dora8")
    assert (card["id"], card["kind"]) == (name, "dora")
    client.delete_adapter(name)
    with pytest.raises(LoraplexAPIError) as err:
        client.register_adapter_path(fresh("path"), "/etc")
    assert (err.value.status, err.value.param) == (400, "path")


def test_admin_errors(client: LoraplexClient, adapter_root: Path, tmp_path: Path) -> None:
    name = fresh("dup")
    assert client.upload_adapter(name, adapter_root / "lora8", shared=True)["shared"] is True
    try:
        with pytest.raises(LoraplexAPIError) as err:
            client.upload_adapter(name, adapter_root / "lora8")
        assert (err.value.status, err.value.type, err.value.param) == \
            (409, "conflict_error", "name")
    finally:
        client.delete_adapter(name)
    with pytest.raises(LoraplexAPIError) as err:
        client.upload_adapter("bad name!", adapter_root / "lora8")
    assert err.value.status == 400
    with pytest.raises(AdapterFolderError, match="adapter_model.safetensors"):
        (tmp_path / "adapter_config.json").write_text("{}")
        client.upload_adapter(fresh("x"), tmp_path)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_bytes(
        (adapter_root / "lora8" / "adapter_config.json").read_bytes())
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(LoraplexAPIError) as err:
        client.upload_adapter(fresh("corrupt"), corrupt)
    assert err.value.status == 400
    with pytest.raises(LoraplexAPIError) as err:
        client.delete_adapter(fresh("never"))
    assert (err.value.status, err.value.type) == (404, "not_found_error")


# ---- errors ----------------------------------------------------------------------------------
def test_unknown_model_is_404_plain_and_streamed(client: LoraplexClient) -> None:
    with pytest.raises(LoraplexAPIError) as err:
        client.complete(PROMPT, model="no-such-adapter")
    assert (err.value.status, err.value.type) == (404, "not_found_error")
    assert "no-such-adapter" in err.value.message
    with pytest.raises(LoraplexAPIError) as err:
        list(client.chat_stream(MESSAGES, model="no-such-adapter"))
    assert err.value.status == 404
    with pytest.raises(LoraplexAPIError) as err:
        client.complete(PROMPT, max_tokens=-1)
    assert (err.value.status, err.value.type) == (400, "invalid_request_error")


def test_api_keys_and_upload_limit(chat_model: ChatModel, adapter_root: Path,
                                   tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys.json", {"acme": {"keys": ["sk-acme"]}})
    srv = start_server(chat_model[1], api_keys=keys, adapter_store=tmp_path / "store",
                       max_upload_bytes=4096)
    try:
        with LoraplexClient(srv.url, api_key="sk-acme", timeout=60) as good:
            assert good.models()["data"][0]["id"] == MODEL_NAME
            assert good.complete(PROMPT, max_tokens=3, ignore_eos=True)["usage"][
                "completion_tokens"] == 3
            with pytest.raises(LoraplexAPIError) as err:
                good.upload_adapter(fresh("big"), adapter_root / "lora64")
            assert err.value.status == 413
        for key in ("sk-wrong", None):
            with LoraplexClient(srv.url, api_key=key, timeout=60) as bad:
                with pytest.raises(LoraplexAPIError) as err:
                    bad.complete(PROMPT, model=MODEL_NAME, max_tokens=3)
                assert (err.value.status, err.value.type) == (401, "authentication_error")
                with pytest.raises(LoraplexAPIError) as err:
                    bad.list_adapters()
                assert err.value.status == 401
        rc = main(["adapters", "list", "--url", srv.url, "--api-key", "sk-wrong"])
        assert rc == 1
    finally:
        srv.stop()


def test_unreachable_server() -> None:
    with LoraplexClient(f"http://127.0.0.1:{free_port()}", timeout=5) as c:
        with pytest.raises(LoraplexConnectionError, match="cannot talk to"):
            c.health()
        with pytest.raises(LoraplexConnectionError):
            list(c.complete_stream(PROMPT, model="m"))


def test_sse_parser_framing() -> None:
    parser = SSEParser()
    lines = [": keep-alive", "", "event: message", 'data: {"a":', "data: 1}", "id: 7", "",
             "retry: 100", 'data: {"b": 2}', "", "data: [DONE]", "", 'data: {"late": 1}', ""]
    events = [e for e in map(parser.feed, lines) if e is not None]
    assert events == [{"a": 1}, {"b": 2}]
    assert parser.done
    parser = SSEParser()
    assert parser.feed('data: {"x": 1}') is None
    assert parser.close() == {"x": 1} and not parser.done
    for lines in (['data: {"error": {"message": "boom", "type": "t", "code": 503}}', ""],
                  ["event: error", 'data: {"message": "boom"}', ""]):
        parser = SSEParser()
        with pytest.raises(LoraplexAPIError, match="boom") as err:
            for line in lines:
                parser.feed(line)
        assert err.value.status in (503, 500)


def test_error_body_not_in_openai_shape() -> None:
    err = LoraplexAPIError.from_response(502, b"<html>bad gateway</html>")
    assert (err.status, err.type, err.message) == (502, "http_error", "<html>bad gateway</html>")
    err = LoraplexAPIError.from_response(404, b'{"error": {"message": "m", "type": "nf"}}')
    assert (err.status, err.type, err.message, err.param) == (404, "nf", "m", None)


# ---- CLI -------------------------------------------------------------------------------------
def test_cli_complete_and_chat(server: Server, offline: Engine, capsys: Capsys,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_URL", server.url)  # the default of --url
    args = ["--max-tokens", str(NUM_TOKENS), "--temperature", "0", "--ignore-eos"]
    want = offline_text(offline, PROMPT)
    for extra in ([], ["--stream"]):
        assert main(["complete", PROMPT, *args, *extra]) == 0
        assert capsys.readouterr().out == want + "\n"
    want = offline_chat(offline, MESSAGES, "lora8")
    for extra in ([], ["--stream"]):
        assert main(["chat", MESSAGES[1]["content"], "--system", MESSAGES[0]["content"],
                     "--model", "lora8", *args, *extra]) == 0
        assert capsys.readouterr().out == want + "\n"
    assert main(["complete", PROMPT, "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["object"] == "text_completion"


def test_cli_adapters(server: Server, adapter_root: Path, capsys: Capsys) -> None:
    url = ["--url", server.url]
    name = fresh("cli")
    assert main(["adapters", "upload", name, str(adapter_root / "lora8"), *url]) == 0
    assert capsys.readouterr().out == f"uploaded {name}: lora rank 8, version 1\n"
    assert main(["adapters", "list", *url]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["NAME", "KIND", "RANK"]
    row = next(r.split() for r in table if r.startswith(name + " "))
    assert row[:4] == [name, "lora", "8", "1"]
    assert main(["adapters", "replace", name, str(adapter_root / "lora64"), *url]) == 0
    assert capsys.readouterr().out == f"replaced {name}: lora rank 64, version 2\n"
    assert main(["adapters", "show", name, *url]) == 0
    card = json.loads(capsys.readouterr().out)
    assert (card["id"], card["rank"], card["version"]) == (name, 64, 2)
    assert main(["adapters", "delete", name, *url]) == 0
    assert capsys.readouterr().out == f"deleted {name}\n"
    assert main(["adapters", "show", name, *url]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and "404" in captured.err
    assert "Traceback" not in captured.err


def test_cli_errors_never_traceback(server: Server, tmp_path: Path, capsys: Capsys) -> None:
    cases = [["complete", PROMPT, "--model", "nope", "--url", server.url],
             ["chat", "hi", "--stream", "--model", "nope", "--url", server.url],
             ["adapters", "upload", fresh("e"), str(tmp_path), "--url", server.url],
             ["adapters", "list", "--url", f"http://127.0.0.1:{free_port()}"]]
    for argv in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, (argv, err)


def test_format_table_pads_and_marks_missing() -> None:
    table = format_table([{"id": "a", "kind": "lora", "rank": 8, "version": 1, "shared": True},
                          {"id": "longer-name", "location": "disk"}])
    lines = table.splitlines()
    assert len(lines) == 3 and lines[1].split()[:4] == ["a", "lora", "8", "1"]
    assert lines[1].index("lora") == lines[0].index("KIND") == lines[2].index("  -") + 2
    assert lines[2].split() == ["longer-name", "-", "-", "-", "disk", "-", "-", "-"]
    assert lines[1].split()[-1] == "yes"


def test_cli_subprocess_adapters_list(server: Server) -> None:
    done = subprocess.run([sys.executable, "-m", "loraplex.server.cli", "adapters", "list",
                           "--url", server.url], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    names = {line.split()[0] for line in done.stdout.splitlines()[1:]}
    assert {"lora8", "dora8", "shira4"} <= names
