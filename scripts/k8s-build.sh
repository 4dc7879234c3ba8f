#!/usr/bin/env bash
# Build (once, with caching) the Kubernetes v1.20.2 binaries that the local
# integration/e2e tiers run: kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and kube-proxy, and the kubectl of that same version
# that the tests (and the demo) use instead of whatever kubectl is on PATH.
#
# Why build from source: these machines have no Docker/kind and no registry;
# Debian bookworm ships the complete Kubernetes 1.20.2 source (with vendored
# dependencies) as the `kubernetes` source package, and its Go toolchain can
# build it. See /work/shared/local-cluster.md for the verified facts.
#
# The cache lives OUTSIDE the repository on purpose (CI runs in a fresh clone on
# the same machine and must reuse it):
#   ${FINETUNE_CACHE:-$HOME/.cache/finetune}/k8s-1.20.2/bin/   the binaries
#   .../k8s-1.20.2/src/                                        the source tree
#   .../k8s-1.20.2/src/kubernetes-*/_output/local/go/cache/    Go build cache
#
# Idempotent: when all binaries are cached (and etcd is installed) it exits at
# once without touching apt or the network. The cache has no key beyond "which
# binaries are there": a cache made before a binary joined the list (kubectl)
# gets only the missing ones built, with the Go build cache still warm
# (kubectl alone: ~1-3 min), never the whole set again.
#
#   scripts/k8s-build.sh          build what is missing
#   scripts/k8s-build.sh --bin-dir   print the binaries' directory (nothing is built)
set -euo pipefail

K8S_VERSION=1.20.2
CACHE_ROOT="${FINETUNE_CACHE:-$HOME/.cache/finetune}/k8s-${K8S_VERSION}"
BIN_DIR="$CACHE_ROOT/bin"
SRC_ROOT="$CACHE_ROOT/src"
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl)

if [[ "${1:-}" == --bin-dir ]]; then
  echo "$BIN_DIR"
  exit 0
fi

# Debian packages: build toolchain + the patched reflect2 + runtime tools used
# by scripts/control-plane.sh (etcd-server, openssl).
BUILD_PACKAGES=(golang-go rsync jq dpkg-dev golang-github-modern-go-reflect2-dev)
RUNTIME_PACKAGES=(etcd-server openssl)

missing_binaries() {  # the binaries not in the cache yet, one per line
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "$BIN_DIR/$b" ]] || echo "$b"
  done
  return 0
}
all_binaries_cached() { [[ -z "$(missing_binaries)" ]]; }

# ---- fast path: nothing to do -------------------------------------------------
if all_binaries_cached && command -v etcd >/dev/null && command -v openssl >/dev/null; then
  echo "k8s-build: all binaries cached in $BIN_DIR (nothing to do)"
  exit 0
fi

T0=$(date +%s)
phase_start=$T0
phase() {  # print how long the previous phase took, then announce the next
  local now; now=$(date +%s)
  echo "k8s-build: [+$((now - T0))s, previous phase $((now - phase_start))s] $*"
  phase_start=$now
}

if [[ $(id -u) -ne 0 ]]; then
  echo "k8s-build: must run as root (installs Debian packages)" >&2
  exit 1
fi

mkdir -p "$CACHE_ROOT"
# Serialize concurrent callers (e.g. a developer and the pytest fixture): the
# second one waits for the first build and then finds everything cached.
exec 9>"$CACHE_ROOT/.build.lock"
if ! flock -n 9; then
  echo "k8s-build: another build holds $CACHE_ROOT/.build.lock; waiting for it..."
  flock 9
fi
if all_binaries_cached && command -v etcd >/dev/null && command -v openssl >/dev/null; then
  echo "k8s-build: binaries were built by a concurrent run; nothing to do"
  exit 0
fi

# ---- Debian packages ------------------------------------------------------------
# Other processes on the machine may hold the dpkg lock: wait instead of failing.
APT=(apt-get -y -q -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
export DEBIAN_FRONTEND=noninteractive

apt_updated=0
apt_update_once() {
  if [[ $apt_updated -eq 0 ]]; then
    "${APT[@]}" update
    apt_updated=1
  fi
}

# The machine's apt sources only list `deb`; `apt-get source` needs `deb-src`.
# The kubernetes package version (…+deb12u1) comes from bookworm-security, so
# add deb-src for both the main and the security archive.
DEB_SRC_FILE=/etc/apt/sources.list.d/finetune-deb-src.sources
if ! grep -rqs '^Types:.*deb-src' /etc/apt/sources.list.d/ && \
   ! grep -qs '^deb-src' /etc/apt/sources.list; then
  phase "adding deb-src entries ($DEB_SRC_FILE)"
  cat > "$DEB_SRC_FILE" <<'EOF'
# Added by finetune scripts/k8s-build.sh: `apt-get source kubernetes` needs deb-src.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt_update_once
fi

missing=()
for p in "${BUILD_PACKAGES[@]}" "${RUNTIME_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  phase "installing Debian packages: ${missing[*]}"
  apt_update_once
  "${APT[@]}" install --no-install-recommends "${missing[@]}"
fi

if all_binaries_cached; then
  phase "binaries already cached; only packages were missing. Done."
  exit 0
fi

# ---- source --------------------------------------------------------------------
mkdir -p "$SRC_ROOT"
find_tree() { find "$SRC_ROOT" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n1; }
TREE=$(find_tree)
if [[ -z "$TREE" || ! -f "$TREE/.finetune-unpacked" ]]; then
  phase "apt-get source kubernetes into $SRC_ROOT"
  # Start clean: a half-unpacked tree from an interrupted run is not trusted.
  rm -rf "$SRC_ROOT" && mkdir -p "$SRC_ROOT"
  # apt-get source as root warns that it cannot drop privileges to _apt for the
  # download; harmless. dpkg-source (dpkg-dev) unpacks and applies debian/patches.
  (cd "$SRC_ROOT" && apt_update_once && "${APT[@]}" source kubernetes)
  TREE=$(find_tree)
  [[ -n "$TREE" ]] || { echo "k8s-build: no kubernetes-* tree after apt-get source" >&2; exit 1; }
  touch "$TREE/.finetune-unpacked"
fi
echo "k8s-build: source tree $TREE"

# ---- required patch: reflect2 v1.0.2 ---------------------------------------------
# The vendored github.com/modern-go/reflect2 v1.0.1 crashes under Go >= 1.18
# ("fatal error: fault" in map iteration inside json-iterator) as soon as the
# apiserver serves custom resources. Debian's golang-github-modern-go-reflect2-dev
# carries v1.0.2 which fixes it: swap it into vendor/ (only the package files;
# its tests are not needed).
REFLECT2_SRC=/usr/share/gocode/src/github.com/modern-go/reflect2
REFLECT2_DST="$TREE/vendor/github.com/modern-go/reflect2"
[[ -d "$REFLECT2_SRC" ]] || { echo "k8s-build: $REFLECT2_SRC missing" >&2; exit 1; }
phase "patching vendor/github.com/modern-go/reflect2 with v1.0.2 from $REFLECT2_SRC"
# (vendor/modules.txt is left alone: hack/lib/init.sh builds with GO111MODULE=off.)
rsync -a --delete --exclude '*_test.go' --exclude 'test*/' "$REFLECT2_SRC/" "$REFLECT2_DST/"

# ---- build -------------------------------------------------------------------------
# GOPATH layout, as Debian's own rules do: <tree>/.go/src/k8s.io/kubernetes -> <tree>.
mkdir -p "$TREE/.go/src/k8s.io"
ln -sfn "$TREE" "$TREE/.go/src/k8s.io/kubernetes"

export GOPATH="$TREE/.go"
# Go build cache: Kubernetes' hack/lib/golang.sh forces GOCACHE=<tree>/_output/local/go/cache,
# i.e. inside the source tree under $CACHE_ROOT, so it is kept with the cache anyway.
export GOTMPDIR="$CACHE_ROOT/gotmp"        # avoid filling a small /tmp
export CGO_ENABLED=0                      # static binaries, no C toolchain needed
mkdir -p "$GOTMPDIR"
# The Debian tarball has no .git, so hack/lib/version.sh would stamp a bogus
# version; pass the real one (clients and our smoke test check 1.20.x).
export KUBE_GIT_VERSION="v${K8S_VERSION}" KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20 \
       KUBE_GIT_TREE_STATE=clean KUBE_GIT_COMMIT="${KUBE_GIT_COMMIT:-faecb196815e248d3ecfb03c680a4507229c2a56}"

# Only what is missing: the others are cached already.
mapfile -t TO_BUILD < <(missing_binaries)
WHAT=""
for b in "${TO_BUILD[@]}"; do WHAT+="cmd/$b "; done
phase "go $(go env GOVERSION) building: ${WHAT% } (cold: ~7 min on 2 idle cores; warm Go cache: ~30 s)"
(cd "$GOPATH/src/k8s.io/kubernetes" && make WHAT="${WHAT% }")

# ---- install into the cache ----------------------------------------------------------
phase "copying binaries to $BIN_DIR"
mkdir -p "$BIN_DIR"
for b in "${TO_BUILD[@]}"; do
  built=$(find "$TREE/_output" -type f -name "$b" -perm -u+x | head -n1)
  [[ -n "$built" ]] || { echo "k8s-build: $b was not built" >&2; exit 1; }
  # copy then rename: a concurrent reader never sees a half-written binary
  cp "$built" "$BIN_DIR/.$b.tmp" && mv -f "$BIN_DIR/.$b.tmp" "$BIN_DIR/$b"
done
"$BIN_DIR/kube-apiserver" --version
"$BIN_DIR/kubectl" version --client --short 2>/dev/null || "$BIN_DIR/kubectl" version --client
phase "done: total $(( $(date +%s) - T0 ))s"
