"""``mfo-actors chat --config FILE [--session KEY] MESSAGE``: talk to the MFO server.

The answer is streamed to stdout as it arrives (``POST /api/chat/stream``); ``--no-stream``
waits for it whole. ``--session KEY`` continues the chat session KEY, the one flows talk in
with ``mfo.chat`` ``session: KEY`` (same thread until ``sessions.ttl`` of silence), and
records the turn in the instance's store. The client is the daemon's: auth, retry, breaker
and rate limit from the config. Imports are made when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mfo_actors.client import MFOClient
    from mfo_actors.store import EventStore

__all__ = ["configure"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Send MESSAGE to the MFO server of an instance and print the answer as "
        "it arrives. --session KEY continues that chat session (the thread flows use with "
        "mfo.chat session: KEY)."
    )
    parser.add_argument("--config", required=True, metavar="FILE", help="instance config file")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--session", metavar="KEY", help="continue the chat session KEY")
    where.add_argument("--thread", metavar="ID", help="talk in this thread (no session)")
    parser.add_argument("--model", help="ask for this model")
    parser.add_argument("--no-stream", action="store_true",
                        help="wait for the whole answer (POST /api/chat) instead of streaming")
    parser.add_argument("message", metavar="MESSAGE", help="the message ('-' reads stdin)")
    parser.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    """Send the message, print the answer; 1 (one line on stderr) if the call fails."""
    import anyio

    from mfo_actors.client import MFOClient
    from mfo_actors.commands._common import quiet_logs, with_store
    from mfo_actors.config import load_config
    from mfo_actors.errors import UserError

    message = sys.stdin.read() if args.message == "-" else args.message
    if not message.strip():
        raise UserError("the message is empty")
    if args.session is not None and not args.session.strip():
        raise UserError("--session needs a key")
    cfg = load_config(args.config)
    try:
        client = MFOClient.from_config(cfg)
    except ValueError as exc:
        raise UserError(f"{args.config}: cannot build the MFO client: {exc}") from None

    async def talk(store: EventStore | None) -> None:
        async with client:
            await _talk(client, args, message, store, cfg)

    if args.session is None:
        with quiet_logs():
            anyio.run(talk, None, backend="asyncio")
    else:
        with_store(cfg, args.config, talk, must_exist=False)
    return 0


async def _talk(client: MFOClient, args: argparse.Namespace, message: str,
                store: EventStore | None, cfg: Any) -> None:
    from mfo_actors.actors.sessions import StoreSessions
    from mfo_actors.client import ClientError
    from mfo_actors.errors import UserError

    out = sys.stdout
    keeper = None
    session = None
    thread_id: str | None = args.thread
    if store is not None:
        keeper = StoreSessions(store, cfg.sessions, instance=cfg.instance)
        session = await keeper.open(args.session)
        thread_id = session["thread_id"]
    parts: list[str] = []
    try:
        if args.no_stream:
            reply = await client.chat.send(message, thread_id=thread_id, model=args.model)
            parts.append(reply.content)
            out.write(reply.content)
            thread_id = reply.thread_id or thread_id
        else:
            async with client.chat.stream(message, thread_id=thread_id,
                                          model=args.model) as chunks:
                async for text in chunks:
                    out.write(text)
                    out.flush()
                    parts.append(text)
                thread_id = chunks.thread_id or thread_id
    except ClientError as exc:
        if parts:
            out.write("\n")  # end the partial answer's line before the error
            out.flush()
        raise UserError(f"chat failed: {exc}") from None
    content = "".join(parts)
    out.write("\n")
    out.flush()
    if keeper is not None and session is not None:
        session = await keeper.record_turn(session, thread_id=thread_id or session["thread_id"],
                                           sent=message, reply=content)
        print(f"session {session['key']}: thread {session['thread_id']}, "
              f"turn {session['turns']}", file=sys.stderr)
