"""The ceiling: bare Hypercorn-trio serving a raw ASGI app that reads the body and answers 200.

No framework, no auth, no parsing, no storage: whatever ct-appliance does on top of this is what
its ratio to this server measures. Served in-process by `hypercorn.trio.serve`, as the appliance
is.

    python bench/bare_asgi.py --bind 127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

ANSWER = b'{"status":"accepted"}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    while True:  # read the whole body
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        if not message.get("more_body", False):
            break
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", required=True)
    args = parser.parse_args()
    config = Config()
    config.bind = [args.bind]
    config.accesslog = None
    trio.run(partial(serve, cast(Any, app), config))


if __name__ == "__main__":
    main()
