"""Keep hubgate's route table equal to a JSON file, and print what changed.

What a platform other than JupyterHub does with hubgate: it knows which workspaces run and where,
writes them down as `{path: {"target": url, ...}}` (paths as in a URL: a literal `%` is `%25`),
and makes hubgate's table exactly that. Only
the operations of hubgate's OpenAPI document (docs/openapi.json) are used, with nothing but the
Python standard library:

- `getTable` (GET /api/proxy), paged with the JupyterHub pagination media type, for the table
  as it is and its version;
- `syncTable` (POST /api/proxy), which makes the table equal to the file in one atomic step
  (`?dry_run=true` only counts);
- `getTable` with `since`, for exactly what changed after the version read first.

    HUBGATE_API_URL=http://127.0.0.1:8001 CONFIGPROXY_AUTH_TOKEN=... \\
        python3 examples/sync_table.py routes.json [--dry-run] [--page-size N]

Prints one line per change (`+` added, `~` changed, `-` removed) and a summary. Exit status 0
when the table is as the file says, 1 when hubgate refused (its message is printed; nothing was
changed), 2 when the file cannot be read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

PAGINATION = "application/jupyterhub-pagination+json"


class Refused(Exception):
    """hubgate answered with an error status."""


class Client:
    def __init__(self, base: str, token: str | None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        # The API is on a private address: never go through an HTTP proxy from the environment.
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def call(
        self, method: str, path: str, body: object = None, accept: str | None = None
    ) -> tuple[dict, dict]:
        """Sends one request; returns the JSON answer and the response headers."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if accept:
            req.add_header("Accept", accept)
        if self.token:
            req.add_header("Authorization", f"token {self.token}")
        try:
            with self.opener.open(req, timeout=60) as resp:
                return json.loads(resp.read() or b"{}"), dict(resp.headers)
        except urllib.error.HTTPError as e:
            text = e.read().decode(errors="replace")
            try:
                message = json.loads(text)["message"]
            except (ValueError, KeyError, TypeError):
                message = text or e.reason  # 403 has an empty body
            raise Refused(f"{method} {path}: {e.code} {message}") from None

    def table(self, page_size: int) -> tuple[dict, int]:
        """The whole table, read page by page, and the version of its first page."""
        routes: dict = {}
        offset, version = 0, None
        while True:
            query = urllib.parse.urlencode({"offset": offset, "limit": page_size})
            page, _ = self.call("GET", f"/api/proxy?{query}", accept=PAGINATION)
            routes.update(page["items"])
            if version is None:
                version = page["version"]
            following = page["_pagination"]["next"]
            if following is None:
                return routes, version
            offset = following["offset"]

    def changes_since(self, version: int) -> dict:
        answer, _ = self.call("GET", f"/api/proxy?since={version}")
        return answer


def describe(key: str, now: dict | None, before: dict | None) -> str:
    if now is None:
        return f"- {key}"
    if before is None:
        return f"+ {key} -> {now['target']}"
    if before.get("target") != now["target"]:
        return f"~ {key} -> {now['target']} (was {before.get('target')})"
    return f"~ {key} -> {now['target']} (data changed)"


def main() -> int:
    parser = argparse.ArgumentParser(description="Make hubgate's route table equal to a file.")
    parser.add_argument("file", help='JSON: {"/path": {"target": "http://...", ...}, ...}')
    parser.add_argument("--dry-run", action="store_true", help="only count the changes")
    parser.add_argument("--page-size", type=int, default=500)
    parser.add_argument("--url", default=os.environ.get("HUBGATE_API_URL", "http://127.0.0.1:8001"))
    opts = parser.parse_args()

    try:
        with open(opts.file, encoding="utf-8") as f:
            desired = json.load(f)
    except (OSError, ValueError) as e:
        print(f"cannot read {opts.file}: {e}", file=sys.stderr)
        return 2
    if not isinstance(desired, dict):
        print(f"{opts.file} must hold a JSON object of routes", file=sys.stderr)
        return 2

    client = Client(opts.url, os.environ.get("CONFIGPROXY_AUTH_TOKEN"))
    try:
        before, version = client.table(opts.page_size)
        query = "?dry_run=true" if opts.dry_run else ""
        summary, _ = client.call("POST", f"/api/proxy{query}", desired)
        if not opts.dry_run:
            # Exactly what changed since the table was read: this sync, and anything another
            # client changed meanwhile.
            for key, now in sorted(client.changes_since(version).items()):
                print(describe(key, now, before.get(key)))
    except Refused as e:
        print(f"hubgate refused: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot reach hubgate at {opts.url}: {e}", file=sys.stderr)
        return 1
    verb = "would change" if opts.dry_run else "synced"
    print(
        f"{verb}: {summary['added']} added, {summary['updated']} updated, "
        f"{summary['removed']} removed, {summary['unchanged']} unchanged; "
        f"table version {summary['version']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
