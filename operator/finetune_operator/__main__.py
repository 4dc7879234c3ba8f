"""`python -m finetune_operator`: run the operator (in a cluster or against a kubeconfig)."""

from __future__ import annotations

import argparse
import logging
import os

import kopf

from finetune_operator import handlers  # noqa: F401  (registers the handlers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    parser.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[n for n in os.environ.get("WATCH_NAMESPACES", "").split(",") if n],
        help="Namespace to serve (repeatable; globs allowed). Default: all namespaces.",
    )
    parser.add_argument(
        "--liveness", default=os.environ.get("LIVENESS_ENDPOINT"), help="e.g. http://0.0.0.0:8080/healthz"
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace or [],
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
