"""The `loraplex` CLI's client commands: `complete`, `chat` and `adapters list|upload|show|
replace|delete`, added to the server's parser by `add_commands`. Output goes to stdout; errors
print `error: <message>` to stderr and exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from loraplex.clients.client import (
    DEFAULT_URL,
    LoraplexClient,
    LoraplexError,
    text_of,
)

URL_ENV = "LORAPLEX_URL"
API_KEY_ENV = "LORAPLEX_API_KEY"
_TABLE_COLUMNS = (("NAME", "id"), ("KIND", "kind"), ("RANK", "rank"), ("VERSION", "version"),
                  ("LOCATION", "location"), ("RUNNING", "num_running"), ("OWNER", "owner"),
                  ("SHARED", "shared"))

Command = Callable[[LoraplexClient, argparse.Namespace], None]


def _env(name: str) -> str | None:
    """One place where the client commands read the environment (empty counts as unset)."""
    return os.environ.get(name) or None


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=_env(URL_ENV) or DEFAULT_URL,
                        help=f"the server (default: ${URL_ENV} or {DEFAULT_URL})")
    common.add_argument("--api-key", default=_env(API_KEY_ENV),
                        help=f"API key sent as a Bearer token (default: ${API_KEY_ENV})")
    common.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    return common


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model or adapter name (default: the server's base model)")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past end-of-sequence (up to --max-tokens)")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")
    p.add_argument("--json", action="store_true",
                   help="print the whole response (each chunk, with --stream) as JSON")


def _params(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature,
            "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed, "stop": args.stop,
            "ignore_eos": args.ignore_eos}


def _runner(command: Command) -> Callable[[argparse.Namespace], int]:
    """Wrap a command: open the client, map every client error to `error: …` and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            with LoraplexClient(args.url, args.api_key, args.timeout) as client:
                command(client, args)
        except LoraplexError as exc:
            sys.stdout.flush()
            sys.stderr.write(f"error: {exc}\n")
            return 1
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            return 130
        return 0

    return run


def _print_json(value: object) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _print_stream(chunks: Iterator[dict], as_json: bool) -> None:
    for chunk in chunks:
        if as_json:
            sys.stdout.write(json.dumps(chunk, ensure_ascii=False) + "\n")
        else:
            sys.stdout.write(text_of(chunk))
        sys.stdout.flush()
    if not as_json:
        sys.stdout.write("\n")


def _show(response: dict, as_json: bool) -> None:
    if as_json:
        _print_json(response)
    else:
        sys.stdout.write(text_of(response) + "\n")


# ---- generation ----------------------------------------------------------------------------
def _complete(client: LoraplexClient, args: argparse.Namespace) -> None:
    if args.stream:
        _print_stream(client.complete_stream(args.prompt, args.model, **_params(args)), args.json)
    else:
        _show(client.complete(args.prompt, args.model, **_params(args)), args.json)


def _chat(client: LoraplexClient, args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": args.message})
    if args.stream:
        _print_stream(client.chat_stream(messages, args.model, **_params(args)), args.json)
    else:
        _show(client.chat(messages, args.model, **_params(args)), args.json)


# ---- adapters ------------------------------------------------------------------------------
def _cell(card: dict, key: str) -> str:
    value = card.get(key)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(cards: list[dict]) -> str:
    """Adapter cards as a fixed-width table (a header line, one line per adapter)."""
    rows = [[header for header, _ in _TABLE_COLUMNS]]
    rows += [[_cell(card, key) for _, key in _TABLE_COLUMNS] for card in cards]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_TABLE_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                     for row in rows)


def _summary(verb: str, card: dict) -> str:
    return (f"{verb} {card.get('id')}: {card.get('kind', '?')} rank {card.get('rank', '?')}, "
            f"version {card.get('version', '?')}")


def _list(client: LoraplexClient, args: argparse.Namespace) -> None:
    cards = client.list_adapters()
    if args.json:
        _print_json(cards)
    elif cards:
        sys.stdout.write(format_table(cards) + "\n")
    else:
        sys.stdout.write("no adapters\n")


def _upload(client: LoraplexClient, args: argparse.Namespace) -> None:
    card = client.upload_adapter(args.name, args.dir, shared=True if args.shared else None)
    sys.stdout.write(_summary("uploaded", card) + "\n")


def _show_adapter(client: LoraplexClient, args: argparse.Namespace) -> None:
    _print_json(client.get_adapter(args.name))


def _replace(client: LoraplexClient, args: argparse.Namespace) -> None:
    sys.stdout.write(_summary("replaced", client.replace_adapter(args.name, args.dir)) + "\n")


def _delete(client: LoraplexClient, args: argparse.Namespace) -> None:
    client.delete_adapter(args.name)
    sys.stdout.write(f"deleted {args.name}\n")


def _add_adapters(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    adapters = sub.add_parser("adapters", help="manage adapters on a running server")
    asub = adapters.add_subparsers(dest="adapters_command", required=True)
    p = asub.add_parser("list", parents=[common], help="the adapters you may use, as a table")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    p.set_defaults(run=_runner(_list))
    p = asub.add_parser("upload", parents=[common], help="upload a local PEFT adapter folder")
    p.add_argument("name")
    p.add_argument("dir", type=Path, help="folder with adapter_config.json and "
                   "adapter_model.safetensors")
    p.add_argument("--shared", action="store_true", help="visible to every tenant (admin)")
    p.set_defaults(run=_runner(_upload))
    p = asub.add_parser("show", parents=[common], help="one adapter's card, as JSON")
    p.add_argument("name")
    p.set_defaults(run=_runner(_show_adapter))
    p = asub.add_parser("replace", parents=[common], help="hot-swap to a new version")
    p.add_argument("name")
    p.add_argument("dir", type=Path)
    p.set_defaults(run=_runner(_replace))
    p = asub.add_parser("delete", parents=[common], help="delete an adapter")
    p.add_argument("name")
    p.set_defaults(run=_runner(_delete))


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add `complete`, `chat` and `adapters …` to the `loraplex` parser's subcommands."""
    common = _common()
    p = sub.add_parser("complete", parents=[common], help="complete a prompt on a server")
    p.add_argument("prompt")
    _sampling(p)
    p.set_defaults(run=_runner(_complete))
    p = sub.add_parser("chat", parents=[common], help="send one chat message to a server")
    p.add_argument("message")
    p.add_argument("--system", default=None, help="a system message before it")
    _sampling(p)
    p.set_defaults(run=_runner(_chat))
    _add_adapters(sub, common)
