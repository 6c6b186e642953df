#!/usr/bin/env python3
"""Example internal import service for `importer.url` (stdlib only).

It verifies `CT-Signature` (HMAC-SHA256 hex of the raw body under `importer.sign_secret`) in
constant time BEFORE parsing, answers 401 when it does not match (a 4xx: the delivery goes
dead, someone must look), appends each delivery to a JSON-lines file, skips a
`CT-Delivery-Id` it already has (re-runs after a crash carry the same id), and answers 200.

    python3 examples/http_receiver.py [--port 8090] [--secret-file var/hmac-secret]
                                      [--out var/imported-http.jsonl]
"""

import argparse
import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()


def make_handler(secret: bytes, out: str) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            given = self.headers.get("ct-signature", "")
            expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(given.lower(), expected):
                return self.answer(401, {"error": "bad signature"})
            doc = json.loads(body)
            delivery_id = self.headers["ct-delivery-id"]
            with LOCK:
                try:
                    with open(out, encoding="utf-8") as f:
                        seen = {json.loads(line)["delivery_id"] for line in f}
                except FileNotFoundError:
                    seen = set()
                if delivery_id not in seen:
                    with open(out, "a", encoding="utf-8") as f:
                        f.write(json.dumps(doc) + "\n")
            self.answer(200, {"imported": len(doc["flow_ids"]), "delivery_id": delivery_id})

        def answer(self, status: int, doc: dict) -> None:
            data = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--secret-file", default="var/hmac-secret")
    p.add_argument("--out", default="var/imported-http.jsonl")
    args = p.parse_args()
    secret = open(args.secret_file, encoding="utf-8").read().strip().encode()
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(secret, args.out))
    print(f"example import service on http://127.0.0.1:{args.port}/import -> {args.out}")
    server.serve_forever()


if __name__ == "__main__":
    main()
