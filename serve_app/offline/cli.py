"""``serve-app``: operator commands next to ``serve run``.

* ``serve-app keygen [--file PATH] [--id NAME]``: create the API-key file (0600) named in
  the YAML unless it exists (with ``--id``: add a ``NAME:KEY`` line), print the new key
  once, and create the webhook signing secret.
* ``serve-app webhook-secret (--id NAME | < key)``: the secret that signs that key's
  webhooks (each key's own, derived from the service's secret): hand it out with the key.
* ``serve-app run [CONFIG]``: ``serve run CONFIG`` with ``configs/serve.env`` set and
  HAProxy's admin socket in a directory only this user can enter (``run.py``).
* ``serve-app build [CONFIG] [--force]``: build the example store and model.
* ``serve-app config-reference``: every setting with its default, as Markdown.
* ``serve-app load-features --to redis://... --from FILE``: validate entity features
  (SQLite, Parquet or CSV) against the feature schema and load them into Redis.
* ``serve-app k8s [--config configs/cluster.yaml]``: write a KubeRay RayService manifest.

Each command imports what it needs when it runs: ``keygen`` must not pay for Ray,
FastAPI or scikit-learn to write one key.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path


def _keygen(args: argparse.Namespace) -> int:
    from serve_app.config import load_app_config
    from serve_app.secret_files import (
        append_key,
        new_webhook_secret,
        write_key_file,
        write_secret_file,
    )

    config = load_app_config(Path(args.config))
    path = Path(args.file) if args.file else None
    path = path or (Path(config.auth.keys_file) if config.auth.keys_file else None)
    if path is None:
        print("the config names no auth.keys_file; pass --file", file=sys.stderr)
        return 2
    if args.id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", args.id):
        print("--id: 1-64 letters, digits, '_', '.' or '-'", file=sys.stderr)
        return 2
    try:
        key = write_key_file(path) if args.id is None else append_key(path, args.id)
    except OSError as exc:  # a symlink (ELOOP), another user's file, ...
        print(f"{path}: {exc.strerror or exc}; no key added", file=sys.stderr)
        return 1
    if key is None:
        print(f"{path} exists; keeping its keys", file=sys.stderr)
    else:
        print(f"wrote a new API key to {path} (mode 0600). Use it as:", file=sys.stderr)
        print(f"  curl -H 'Authorization: Bearer {key}' ...", file=sys.stderr)
    secret_file = config.jobs.webhooks.secret_file
    if secret_file and write_secret_file(Path(secret_file), new_webhook_secret()):
        print(f"wrote a new webhook signing secret to {secret_file} (mode 0600)", file=sys.stderr)
    if key is not None and args.id is not None and secret_file:
        print(f"its jobs' webhooks: `serve-app webhook-secret --id {args.id}`", file=sys.stderr)
    return 0


def _run(args: argparse.Namespace) -> int:
    from serve_app.errors import ConfigError
    from serve_app.offline.run import exec_serve_run

    try:
        exec_serve_run(args.config, Path(args.env_file))
    except (ConfigError, OSError) as exc:
        print(f"run: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    return 0  # not reached: exec_serve_run became `serve run`


def _node(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serve_app.errors import ConfigError
    from serve_app.offline.node import exec_ray_start

    ray_args = args.ray_args[1:] if args.ray_args[:1] == ["--"] else args.ray_args
    try:
        exec_ray_start(Path(args.config), Path(args.env_file), ray_args)
    except (ConfigError, OSError) as exc:
        print(f"node: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # the app's args are invalid (values never echoed)
        print(f"node: {args.config}: {exc}", file=sys.stderr)
        return 2
    return 0  # not reached: exec_ray_start became `ray start --block`


def _webhook_secret(args: argparse.Namespace) -> int:
    """Print the secret that signs one API key's webhooks (hand it out with the key)."""
    from serve_app.api.auth import KEY_ID, KeyEntry, parse_entry
    from serve_app.config import load_app_config
    from serve_app.errors import ConfigError
    from serve_app.jobs.webhooks import owner_secret, read_secret

    config = load_app_config(Path(args.config))
    try:
        master = read_secret(config.jobs.webhooks)
    except ConfigError as exc:
        print(f"webhook-secret: {exc.message}", file=sys.stderr)
        return 2
    if master is None:
        print("webhook-secret: no signing secret is configured", file=sys.stderr)
        return 2
    if args.id is not None:
        if not KEY_ID.match(args.id):
            print("webhook-secret: --id: 1-64 letters, digits, '_', '.' or '-'", file=sys.stderr)
            return 2
        owner = KeyEntry("-", args.id).owner
    else:  # the key (or its NAME:KEY line from the key file) on stdin
        presented = sys.stdin.readline().strip()
        if not presented:
            print("webhook-secret: pass --id NAME, or the key on stdin", file=sys.stderr)
            return 2
        owner = parse_entry(presented).owner
    print(owner_secret(master, owner))
    return 0


def _build(args: argparse.Namespace) -> int:
    from serve_app.config import load_app_config
    from serve_app.errors import ServeAppError
    from serve_app.offline.artifacts import build_artifacts
    from serve_app.scoring.artifact import MODEL_FILE, pin_line, sha256_of

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        config = load_app_config(Path(args.config)).resolved(Path.cwd())
        build_artifacts(config, force=args.force)
    except ServeAppError as exc:  # the operator's to mend: the message, not a traceback
        print(f"build: {exc.message}", file=sys.stderr)
        return 1
    model_path = Path(config.artifacts.model_dir) / MODEL_FILE
    digest = sha256_of(model_path)
    print(f"model {model_path} sha256 {digest}", file=sys.stderr)
    print(f"pin it in {args.config} under applications[0].args:", file=sys.stderr)
    print(f"  {pin_line(digest)}")
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from serve_app.offline.config_reference import render

    print(render(), end="")
    return 0


def _load_features(args: argparse.Namespace) -> int:
    from serve_app.errors import ConfigError
    from serve_app.offline.load_features import (
        describe,
        load_into_redis,
        read_input,
        write_rejects,
    )

    try:
        frame = read_input(Path(args.source), args.format)
        report = load_into_redis(frame, args.to, args.batch_size, progress=not args.quiet)
    except ConfigError as exc:
        print(f"load-features: {exc.message}", file=sys.stderr)
        return 2
    print(describe(report, args.to), file=sys.stderr)
    if args.rejects and report.refused:
        write_rejects(report, Path(args.rejects))
    return 1 if report.refused else 0


def _k8s(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from serve_app.config import read_env_file
    from serve_app.errors import ConfigError
    from serve_app.offline.k8s import ManifestOptions, render_manifest

    options = ManifestOptions(
        image=args.image,
        secret_name=args.secret,
        worker_replicas=args.workers,
        name=args.name,
        ray_env=tuple(read_env_file(Path(args.env_file)).items()),
    )
    try:
        text = render_manifest(Path(args.config), options)
    except ConfigError as exc:
        print(f"k8s: {exc.message}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # the app's args are invalid (values never echoed)
        print(f"k8s: {args.config}: {exc}", file=sys.stderr)
        return 2
    if args.out == "-":
        print(text, end="")
    else:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}; apply with: kubectl apply -f {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serve-app")
    commands = parser.add_subparsers(dest="command", required=True)
    keygen = commands.add_parser("keygen", help="create the API-key file if it is missing")
    keygen.add_argument("--config", default="configs/config.yaml")
    keygen.add_argument("--file", default=None)
    keygen.add_argument(
        "--id", default=None, help="add a NAME:KEY line; the key's jobs belong to NAME"
    )
    keygen.set_defaults(run=_keygen)
    run = commands.add_parser(
        "run", help="serve run CONFIG with configs/serve.env and HAProxy's files kept private"
    )
    run.add_argument("config", nargs="?", default="configs/config.yaml")
    run.add_argument("--env-file", default="configs/serve.env")
    run.set_defaults(run=_run)
    node = commands.add_parser(
        "node",
        help="ray start --block for one node of a cluster: configs/serve.env, the config's "
        "variables checked, Ray's token auth on (serve-app node -- --head)",
    )
    node.add_argument("--config", default="configs/cluster.yaml")
    node.add_argument("--env-file", default="configs/serve.env")
    node.add_argument("ray_args", nargs=argparse.REMAINDER, help="-- then ray start's arguments")
    node.set_defaults(run=_node)
    secret = commands.add_parser(
        "webhook-secret", help="print the secret that signs one API key's webhooks"
    )
    secret.add_argument("--config", default="configs/config.yaml")
    secret.add_argument("--id", default=None, help="the key's NAME (else the key on stdin)")
    secret.set_defaults(run=_webhook_secret)
    build = commands.add_parser("build", help="build the example feature store and model")
    build.add_argument("config", nargs="?", default="configs/config.yaml")
    build.add_argument("--force", action="store_true")
    build.set_defaults(run=_build)
    reference = commands.add_parser("config-reference", help="print every setting as Markdown")
    reference.set_defaults(run=_config_reference)
    load = commands.add_parser(
        "load-features", help="validate entity features and load them into Redis"
    )
    load.add_argument("--to", required=True, help="redis://HOST:PORT/DB (${VAR} from env)")
    load.add_argument("--from", dest="source", required=True, help="a .db, .parquet or .csv")
    load.add_argument("--format", choices=["auto", "sqlite", "parquet", "csv"], default="auto")
    load.add_argument("--batch-size", type=int, default=5_000)
    load.add_argument("--rejects", default=None, help="write refused rows here (CSV)")
    load.add_argument("--quiet", action="store_true", help="no progress bar")
    load.set_defaults(run=_load_features)
    k8s = commands.add_parser("k8s", help="write a KubeRay RayService manifest")
    k8s.add_argument("--config", default="configs/cluster.yaml")
    k8s.add_argument("--image", default="serve_app:0.1.0")
    k8s.add_argument("--secret", default="serve-app", help="Kubernetes Secret with keys/URLs")
    k8s.add_argument("--workers", type=int, default=2, help="worker pods")
    k8s.add_argument("--name", default="serve-app")
    k8s.add_argument(
        "--env-file", default="configs/serve.env", help="Ray's environment, as `serve run` gets it"
    )
    k8s.add_argument("--out", default="-", help="file, or - for stdout")
    k8s.set_defaults(run=_k8s)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
