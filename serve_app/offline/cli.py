"""``serve-app``: operator commands next to ``serve run``.

* ``serve-app keygen [--file PATH]``: create the API-key file (0600) named in the YAML
  unless it exists, print the new key once, and create the webhook signing secret.
* ``serve-app build [CONFIG] [--force]``: build the example store and model.
* ``serve-app config-reference``: every setting with its default, as Markdown.

Each command imports what it needs when it runs: ``keygen`` must not pay for Ray,
FastAPI or scikit-learn to write one key.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _keygen(args: argparse.Namespace) -> int:
    from serve_app.config import load_app_config
    from serve_app.secret_files import new_webhook_secret, write_key_file, write_secret_file

    config = load_app_config(Path(args.config))
    path = Path(args.file) if args.file else None
    path = path or (Path(config.auth.keys_file) if config.auth.keys_file else None)
    if path is None:
        print("the config names no auth.keys_file; pass --file", file=sys.stderr)
        return 2
    key = write_key_file(path)
    if key is None:
        print(f"{path} exists; keeping its keys", file=sys.stderr)
    else:
        print(f"wrote a new API key to {path} (mode 0600). Use it as:", file=sys.stderr)
        print(f"  curl -H 'Authorization: Bearer {key}' ...", file=sys.stderr)
    secret_file = config.jobs.webhooks.secret_file
    if secret_file and write_secret_file(Path(secret_file), new_webhook_secret()):
        print(f"wrote a new webhook signing secret to {secret_file} (mode 0600)", file=sys.stderr)
    return 0


def _build(args: argparse.Namespace) -> int:
    from serve_app.config import load_app_config
    from serve_app.offline.artifacts import build_artifacts

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = load_app_config(Path(args.config)).resolved(Path.cwd())
    build_artifacts(config, force=args.force)
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from serve_app.offline.config_reference import render

    print(render(), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serve-app")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="create the API-key file if it is missing")
    keygen.add_argument("--config", default="configs/config.yaml")
    keygen.add_argument("--file", default=None)
    keygen.set_defaults(run=_keygen)
    build = commands.add_parser("build", help="build the example feature store and model")
    build.add_argument("config", nargs="?", default="configs/config.yaml")
    build.add_argument("--force", action="store_true")
    build.set_defaults(run=_build)
    reference = commands.add_parser("config-reference", help="print every setting as Markdown")
    reference.set_defaults(run=_config_reference)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
