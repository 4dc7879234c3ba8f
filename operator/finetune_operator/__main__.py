"""`python -m finetune_operator`: run the operator (in a cluster or against a kubeconfig)."""

from __future__ import annotations

import argparse
import logging
import os

import kopf

from finetune_operator import admission, handlers  # noqa: F401  (registers the handlers)


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
    parser.add_argument(
        "--webhook-port",
        default=os.environ.get("FINETUNE_WEBHOOK_PORT"),
        help="Serve the validating admission webhook (HTTPS) on this port. Default: no webhook.",
    )
    parser.add_argument(
        "--webhook-cert-dir",
        default=os.environ.get("FINETUNE_WEBHOOK_CERT_DIR"),
        help=f"Directory with the webhook's tls.crt and tls.key. Default: {admission.DEFAULT_CERT_DIR}",
    )
    parser.add_argument("--webhook-addr", default=os.environ.get("FINETUNE_WEBHOOK_ADDR"), help="Default: 0.0.0.0")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    webhook = admission.WebhookOptions.from_env(args.webhook_port, args.webhook_cert_dir, args.webhook_addr)
    if webhook is not None:
        admission.enable(webhook)
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
