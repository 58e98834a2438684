"""Tokenizer, chat template, incremental detokenising and stop strings on the demo model's
tokenizer; the oracle is transformers' own tokenizer loaded separately, and plain `str.find`."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from loraplex.model.tokenizer import IncrementalDetokenizer, StopChecker, Tokenizer
from loraplex.model.weights import resolve_model_dir

TEXTS = [
    "Hello, world! The quick brown fox.",
    "héllo wörld, àçcénts: naïve café Ünïcödé",
    "日本語のテキストと中文混合",
    "emoji 🤗🚀 split over byte tokens 🎉🎉",
    "family 👨‍👩‍👧 and flags 🇫🇷🇯🇵",
    "  two leading spaces\n\nblank line\tand a tab",
    "\n\n\nnewlines first",
    " a . b , c n't -- “quotes” … ½ ≠ ∑",
    "def f(x):\n    return x ** 2  # code\n",
    "한국어 텍스트 and Ελληνικά and русский",
    "x",
    "🎉",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer briefly."},
     {"role": "user", "content": "Hi 👋"},
     {"role": "assistant", "content": "Bonjour, ça va ?"},
     {"role": "user", "content": "日本語で"}],
]


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo model's folder (converted from the bundled GGUF once, then cached)."""
    return resolve_model_dir(None)


@pytest.fixture(scope="module")
def tok(demo_dir: Path) -> Tokenizer:
    return Tokenizer(demo_dir)


@pytest.fixture(scope="module")
def hf(demo_dir: Path):
    """The oracle: transformers' tokenizer, a separate instance from ours."""
    return AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama-2-style tokenizer (SentencePiece BPE with byte fallback, built here): decoding
    drops the first token's leading space, unlike the demo model's byte-level BPE."""
    raw = RawTokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                           normalizers.Replace(" ", "▁")])
    corpus = [t for t in TEXTS if t.isascii()] + ["Hello world and more words", "Answer: yes"]
    raw.train_from_iterator(corpus * 10, trainers.BpeTrainer(
        vocab_size=150, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(raw.to_str())
    for byte in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{byte:02X}>", len(spec["model"]["vocab"]))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [  # Llama-2's tokenizer.json decoder
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    fast = PreTrainedTokenizerFast(tokenizer_object=RawTokenizer.from_str(json.dumps(spec)),
                                   bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tmp_path_factory.mktemp("sentencepiece-style")
    fast.save_pretrained(folder)
    return folder


def copy_tokenizer(demo_dir: Path, dest: Path, with_template: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    names = ["tokenizer.json", "tokenizer_config.json"]
    for name in names + (["chat_template.jinja"] if with_template else []):
        shutil.copy(demo_dir / name, dest / name)
    assert "chat_template" not in json.loads((dest / "tokenizer_config.json").read_text())
    return dest


def stream(tok: Tokenizer, prompt_ids: list[int], ids: list[int]) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tok, prompt_ids)
    deltas = [detok.push(i) for i in ids]
    return deltas, detok.text


# ---- encode, decode, eos --------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf, text: str):
    assert tok.encode(text) == hf(text)["input_ids"]
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True) == text


def test_decode_skips_special_tokens_unless_asked(tok: Tokenizer, hf):
    ids = [hf.bos_token_id] + tok.encode("Hi", add_special_tokens=False) + [hf.eos_token_id]
    assert tok.decode(ids) == "Hi"
    assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)
    assert hf.decode(ids) == "<|im_start|>Hi<|im_end|>"


def test_eos_ids_of_the_demo_model(tok: Tokenizer, hf, demo_dir: Path):
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert tok.eos_token_ids[0] == hf.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert set(tok.eos_token_ids) == {hf.eos_token_id, generation["eos_token_id"]}


def test_eos_ids_merge_the_generation_config(demo_dir: Path, tmp_path: Path, hf):
    folder = copy_tokenizer(demo_dir, tmp_path / "gen")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 2, 7]}))
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer(folder).eos_token_ids == (hf.eos_token_id, 5, 7)


def test_eos_ids_fall_back_to_the_model_config(demo_dir: Path, tmp_path: Path, hf):
    """Without generation_config.json, `generate` takes config.json's eos; so do we."""
    folder = copy_tokenizer(demo_dir, tmp_path / "cfg")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 9}))
    assert Tokenizer(folder).eos_token_ids == (hf.eos_token_id, 9)


# ---- chat template --------------------------------------------------------------------------
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_matches_transformers(tok: Tokenizer, hf, chat: int,
                                            add_generation_prompt: bool):
    messages = CHATS[chat]
    text = hf.apply_chat_template(messages, tokenize=False,
                                  add_generation_prompt=add_generation_prompt)
    assert tok.render_chat(messages, add_generation_prompt) == text
    ids = tok.apply_chat_template(messages, add_generation_prompt)
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert ids == hf.apply_chat_template(messages, tokenize=True, return_dict=False,
                                         add_generation_prompt=add_generation_prompt)
    # The template's markers are single special tokens, not spelled out piece by piece.
    assert ids[0] == hf.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(hf.convert_tokens_to_ids("<|im_end|>")) == text.count("<|im_end|>") > 0
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_no_chat_template_is_a_clear_error(demo_dir: Path, tmp_path: Path):
    with_template = Tokenizer(copy_tokenizer(demo_dir, tmp_path / "with"))
    without = Tokenizer(copy_tokenizer(demo_dir, tmp_path / "without", with_template=False))
    assert with_template.has_chat_template and not without.has_chat_template
    with pytest.raises(ValueError, match="chat template"):
        without.apply_chat_template(CHATS[0])


# ---- incremental detokenising ---------------------------------------------------------------
PROMPTS = {
    "chat": CHATS[0],
    "text": "Write something:",
    "newline": "Answer:\n",
    "unicode": "Réponds en 日本語 🤗",
    "one-token": "x",
}


def prompt_ids(tok: Tokenizer, name: str) -> list[int]:
    prompt = PROMPTS[name]
    if isinstance(prompt, list):
        return tok.apply_chat_template(prompt)
    return tok.encode(prompt)


def test_the_texts_split_characters_over_tokens(tok: Tokenizer, hf):
    """Guard: the corpus really has characters spread over several byte tokens."""
    pieces = [hf.decode([i]) for t in TEXTS for i in tok.encode(t, add_special_tokens=False)]
    assert sum("\ufffd" in p for p in pieces) > 10


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_decoding_all_ids(tok: Tokenizer, hf, text: str, prompt: str):
    ids = tok.encode(text, add_special_tokens=False)
    deltas, streamed = stream(tok, prompt_ids(tok, prompt), ids)
    assert "".join(deltas) == streamed == hf.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in d for d in deltas), "half a character was emitted"


@pytest.mark.parametrize("prompt", ["Hello", "Answer:\n", "x"])
def test_stream_with_a_sentencepiece_tokenizer(sp_dir: Path, prompt: str):
    """There `decode(ids)` alone loses the leading space, so the oracle is what the ids add to
    the decoded prompt: decode(prompt + ids) minus decode(prompt)."""
    sp = Tokenizer(sp_dir)
    hf_sp = AutoTokenizer.from_pretrained(sp_dir)
    prompt_ids = sp.encode(prompt)
    trap = sp.encode("Hello world", add_special_tokens=False)
    assert hf_sp.decode(trap) == "Hello world" and hf_sp.decode(trap[1:]) == "world"
    pieces = 0
    for text in TEXTS:
        ids = sp.encode(text, add_special_tokens=False)
        pieces += sum(hf_sp.decode([i]) == "\ufffd" for i in ids)
        head = hf_sp.decode(prompt_ids, skip_special_tokens=True)
        whole = hf_sp.decode(prompt_ids + ids, skip_special_tokens=True)
        assert whole.startswith(head)
        deltas, streamed = stream(sp, prompt_ids, ids)
        assert "".join(deltas) == streamed == whole[len(head):], text
        assert streamed.lstrip(" ") == text.lstrip(" ")
    assert pieces > 10, "byte fallback splits characters"


def test_first_piece_keeps_its_leading_space(tok: Tokenizer):
    ids = tok.encode(" world and more", add_special_tokens=False)
    deltas, _ = stream(tok, tok.encode("Hello"), ids)
    assert deltas[0] == " world"


def test_stream_without_prompt(tok: Tokenizer, hf):
    ids = tok.encode("émoji 🚀 start", add_special_tokens=False)
    deltas, streamed = stream(tok, [], ids)
    assert "".join(deltas) == streamed == hf.decode(ids)


def test_special_tokens_in_the_stream_emit_nothing(tok: Tokenizer, hf):
    start, end = hf.convert_tokens_to_ids("<|im_start|>"), hf.eos_token_id
    ids = (tok.encode("Sure 🤗", add_special_tokens=False) + [end, start]
           + tok.encode("assistant\nnext", add_special_tokens=False) + [end])
    deltas, streamed = stream(tok, tok.encode("Q:"), ids)
    assert streamed == hf.decode(ids, skip_special_tokens=True) == "Sure 🤗assistant\nnext"
    assert deltas[-1] == "" and deltas[ids.index(end)] == ""


@pytest.mark.parametrize("seed", range(40))
def test_stream_of_random_ids_is_always_a_prefix_of_the_full_decode(tok: Tokenizer, hf,
                                                                    seed: int):
    """Arbitrary ids (as a random model emits): text streamed so far is a prefix of the full
    decode at every step, and equals it whenever the ids end on a whole character."""
    rng = random.Random(seed)
    byte_heavy = seed % 2 == 0  # ids of single bytes and byte pairs: characters broken often
    pool = range(100, 400) if byte_heavy else range(len(hf))
    ids = [rng.choice(pool) for _ in range(rng.randint(1, 40))]
    detok = IncrementalDetokenizer(tok, prompt_ids(tok, rng.choice(list(PROMPTS))))
    for n, token in enumerate(ids, start=1):
        detok.push(token)
        full = hf.decode(ids[:n], skip_special_tokens=True)
        assert full.startswith(detok.text), (ids[:n], detok.text, full)
        if not full.endswith("\ufffd"):
            assert detok.text == full, (ids[:n], detok.text, full)


# ---- stop strings ---------------------------------------------------------------------------
def first_new_stop(stops: list[str], text: str, num_new: int) -> int | None:
    """The oracle: the earliest start of a stop occurrence that ends in the new characters."""
    boundary = len(text) - num_new
    starts = [i for s in stops for i in range(len(text) - len(s) + 1)
              if text.startswith(s, i) and i + len(s) > boundary]
    return min(starts, default=None)


def test_stop_checker_examples():
    assert StopChecker(["END", "D"]).check("xxENDyy", 4) == 2           # earliest start wins
    assert StopChecker(["###"]).check("ab##", 1) is None                  # not complete yet
    assert StopChecker(["###"]).check("ab###", 1) == 2                    # straddles the boundary
    assert StopChecker(["abcdef", "x"]).check("x1234", 1) is None         # old, out of reach
    assert StopChecker(["b", "aab"]).check("bbabcbbcac", 2) is None
    assert StopChecker(["\n\n"]).check("one\n\ntwo", 9) == 3
    assert StopChecker(["stop"]).check("stop", 0) is None                 # nothing new
    assert StopChecker(["stop"]).check("stop", 10) == 0                   # more new than text
    assert StopChecker(["日本"]).check("これは日本", 1) == 3


def test_max_holdback():
    assert StopChecker([]).max_holdback == 0
    assert StopChecker(["", "x"]).max_holdback == 0
    assert StopChecker(["abc", "de", ""]).max_holdback == 2
    assert StopChecker([""]).check("anything", 3) is None


@pytest.mark.parametrize("seed", range(10))
def test_stop_checker_equals_naive_find(seed: int):
    rng = random.Random(seed)
    for _ in range(1000):
        stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4)))
                 for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice("abc\n") for _ in range(rng.randint(0, 14)))
        num_new = rng.randint(0, len(text))
        got = StopChecker(stops).check(text, num_new)
        assert got == first_new_stop(stops, text, num_new), (stops, text, num_new)


@pytest.mark.parametrize("seed", range(10))
def test_streamed_stop_with_holdback(seed: int):
    """Text arriving in random chunks, checked and emitted as the engine does: the cut is the
    earliest stop in the text seen when one first completes, and what was emitted before
    (everything but the last `max_holdback` characters) never runs past that cut."""
    rng = random.Random(seed)
    for _ in range(300):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5)))
                 for _ in range(rng.randint(1, 3))]
        checker = StopChecker(stops)
        full = "".join(rng.choice("abc") for _ in range(rng.randint(1, 30)))
        text, emitted, cut = "", 0, None
        while len(text) < len(full) and cut is None:
            chunk = full[len(text):len(text) + rng.randint(1, 4)]
            text += chunk
            cut = checker.check(text, len(chunk))
            seen = [i for s in stops if (i := text.find(s)) >= 0]
            assert cut == (min(seen) if seen else None), (stops, text)
            if cut is None:
                emitted = max(emitted, len(text) - checker.max_holdback)
        if cut is not None:
            assert emitted <= cut, (stops, text, emitted, cut)
