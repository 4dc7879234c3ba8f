#!/usr/bin/env bash
# Build the local cluster's container images WITHOUT Docker, cache them, and import them
# into the local cluster's containerd (k8s.io namespace).
#
#   scripts/images/build.sh [all]     pause + trainer + operator images, then import (default)
#   scripts/images/build.sh pause     the CRI sandbox image only (+ import)
#   scripts/images/build.sh trainer   finetune-trainer:<version> only (+ import)
#   scripts/images/build.sh operator  finetune-operator:<version> only (+ import)
#   scripts/images/build.sh trainer-gpu
#                                     finetune-trainer:<version>-cuda, the GPU trainer image, on demand
#                                     only (never part of `all`, `make cluster` or `make test`): build,
#                                     then scripts/images/check-image.sh on the archive. Not imported
#                                     unless FINETUNE_IMPORT_GPU_IMAGE=1 (the local cluster has no GPU).
#   scripts/images/build.sh import    import the cached archives that containerd lacks
#   scripts/images/build.sh sizes     print each cached image's size: unpacked (the layer tars) and
#                                     compressed (gzip -6 of each layer, as a registry would store it)
#
# Images (archives in ${FINETUNE_CACHE:-$HOME/.cache/finetune}/images/):
#   registry.k8s.io/pause:3.6   one static binary (scripts/images/pause.c), the pod sandbox.
#   finetune-trainer:<version>  <version> from pyproject.toml. The trainer (`python -m
#                               finetune_trainer ...`); the default image of trainer pods. It also
#                               carries the [operator] extra (a superset; the chart does not use it
#                               for the operator any more):
#     layer 1 (base): debootstrap bookworm minbase + python3 (3.11) + a venv at /opt/venv with
#       the project's third-party dependencies (torch from the local wheel folder, then the
#       runtime + [trainer] + [operator] requirements read from pyproject.toml). Cached in
#       images/base-<key>/; <key> hashes those requirement lists, the torch wheel and this
#       recipe's version, so it is rebuilt only when they change (5-10 min).
#     layer 2 (app): the project's own packages: `pip wheel --no-deps .` from the working
#       tree, installed into /opt/venv with --no-deps. Rebuilt every run (seconds); the layer
#       is reproducible, so an unchanged tree yields the same image ID and nothing is imported.
#   finetune-trainer:<version>-cuda  the trainer image for GPU clusters (docs/images.md): the same
#                               two layers and config as finetune-trainer:<version>, but torch is
#                               PyPI's Linux x86_64 wheel (the CUDA build; it pulls the nvidia-*
#                               CUDA runtime wheels), bitsandbytes ([gpu] extra) is added, and
#                               every package comes from PyPI only (FINETUNE_PYPI_INDEX): neither
#                               the local CPU wheel folder nor any other pip source of this
#                               machine is used. The build fails unless torch.version.cuda is set.
#                               No driver inside: the NVIDIA container runtime mounts the node's.
#     layer 1: images/cuda-base-<key>/ (several GB; ~10 min with a fast link).
#     layer 2: the same wheel of the working tree as the CPU trainer image.
#   finetune-operator:<version> the operator's slim image (`python -m finetune_operator`; also the
#                               chart's `helm test` and pre-delete cleanup hooks): no torch,
#                               transformers or datasets.
#     layer 1 (base): the same debootstrap + python3 + /opt/venv, with only the runtime +
#       [operator] requirements. Cached in images/operator-base-<key>/ (~1-2 min to build).
#     layer 2 (app): only the packages finetune_api and finetune_operator, copied from the
#       working tree (not the wheel: finetune_trainer and finetune_cli stay out) and byte-compiled.
#   Both: uid/gid 1000 ("finetune"), WORKDIR /workspace, PATH starts with /opt/venv/bin.
#
# Import: into the containerd of scripts/cluster.sh (socket under its state dir), only when
# that containerd is running and lacks this exact image ID. `scripts/cluster.sh up` runs
# `build.sh pause` and `build.sh import` itself.
#
# Environment (all optional):
#   FINETUNE_CACHE              cache root (default $HOME/.cache/finetune)
#   FINETUNE_CLUSTER_STATE      cluster state dir, to find containerd (default /tmp/finetune-cluster)
#   FINETUNE_CONTAINERD_ADDRESS containerd socket to import into (default: the cluster's)
#   FINETUNE_NO_IMPORT=1        build/cache only
#   FINETUNE_TRAINER_IMAGE      tag of the trainer image (default finetune-trainer:<version>)
#   FINETUNE_OPERATOR_IMAGE     tag of the operator image (default finetune-operator:<version>)
#   FINETUNE_TRAINER_GPU_IMAGE  tag of the GPU trainer image (default finetune-trainer:<version>-cuda)
#   FINETUNE_PYPI_INDEX         the only index of the GPU image's pip installs (default https://pypi.org/simple)
#   FINETUNE_IMPORT_GPU_IMAGE=1 also import the GPU trainer image into the local cluster's containerd
#   FINETUNE_PAUSE_IMAGE        sandbox image tag (default registry.k8s.io/pause:3.6; must match
#                               containerd's sandbox_image, which scripts/cluster.sh sets from it)
#   FINETUNE_DEBIAN_MIRROR      default http://deb.debian.org/debian
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune}"
IMAGES="$CACHE/images"
CLUSTER_STATE="${FINETUNE_CLUSTER_STATE:-/tmp/finetune-cluster}"
SOCK="${FINETUNE_CONTAINERD_ADDRESS:-$CLUSTER_STATE/containerd/containerd.sock}"
PAUSE_TAG="${FINETUNE_PAUSE_IMAGE:-registry.k8s.io/pause:3.6}"
SUITE=bookworm
MIRROR="${FINETUNE_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Bump when the base-layer recipe below changes in a way that needs a rebuild.
BASE_RECIPE=3
OPERATOR_BASE_RECIPE=2
CUDA_BASE_RECIPE=1
PYPI_INDEX="${FINETUNE_PYPI_INDEX:-https://pypi.org/simple}"
PYVER=3.11
SITE=/opt/venv/lib/python$PYVER/site-packages
IMAGE_PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

# Host Python for pyproject parsing (tomllib) and pack_image.py.
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"; else PY=python3; fi
PACK=("$PY" "$SCRIPT_DIR/pack_image.py")

T0=$SECONDS
STAGE_T=$SECONDS
STAGE_NAME=""
log() { echo "images: $*" >&2; }
stage() {  # end the previous stage (print its duration), start the next
  local now=$SECONDS
  [[ -n "$STAGE_NAME" ]] && log "  done: $STAGE_NAME ($((now - STAGE_T))s)"
  STAGE_NAME=$1 STAGE_T=$now
  [[ -n "$1" ]] && log "[+$((now - T0))s] $1"
  return 0
}
human() { du -sh --apparent-size "$1" 2>/dev/null | cut -f1; }

[[ $(id -u) -eq 0 ]] || { log "must run as root (chroot, mounts, containerd)"; exit 1; }

# ---- Debian packages ----------------------------------------------------------------------
APT=(apt-get -y -q -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
apt_updated=0
need_packages() {  # need_packages CMD:PACKAGE ...
  local spec missing=()
  for spec in "$@"; do
    [[ -e "${spec%%:*}" ]] || command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  if ((apt_updated == 0)); then DEBIAN_FRONTEND=noninteractive "${APT[@]}" update >&2; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive "${APT[@]}" install --no-install-recommends "${missing[@]}" >&2
}

# ---- chroot helpers -------------------------------------------------------------------------
MOUNTS=()
mount_in() {  # mount_in ROOTFS SRC DEST [ro]  (bind)
  local root=$1 src=$2 dest=$1$3
  if [[ -d "$src" ]]; then mkdir -p "$dest"; else mkdir -p "$(dirname "$dest")"; [[ -e "$dest" ]] || : >"$dest"; fi
  mount --bind "$src" "$dest"
  [[ "${4:-}" == ro ]] && mount -o remount,bind,ro "$dest"
  MOUNTS+=("$dest")
}
umount_all() {
  local i
  for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do umount -l "${MOUNTS[i]}" 2>/dev/null || true; done
  MOUNTS=()
}
# Mounts left by an interrupted earlier build (anything mounted below the image cache).
umount_stale() {
  local m
  for m in $(awk -v p="$IMAGES/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | sort -r); do
    log "unmounting stale $m"
    umount -l "$m" || true
  done
}
on_exit() {
  local rc=$?
  umount_all
  ((rc == 0)) || log "FAILED (rc=$rc) during: ${STAGE_NAME:-?}"
}
trap on_exit EXIT

# Run a command inside ROOTFS with a clean environment.
in_root() {
  local root=$1; shift
  chroot "$root" /usr/bin/env -i PATH="$IMAGE_PATH" HOME=/root LANG=C.UTF-8 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_DEFAULT_TIMEOUT=180 PIP_ROOT_USER_ACTION=ignore \
    ${PIP_FIND_LINKS_IN:+PIP_FIND_LINKS="$PIP_FIND_LINKS_IN"} \
    ${PIP_EXTRA_INDEX_IN:+PIP_EXTRA_INDEX_URL="$PIP_EXTRA_INDEX_IN"} \
    ${SOURCE_DATE_EPOCH:+SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH"} \
    "$@"
}

# pip's output minus the noise of a file:// index that lacks a project (one line per project).
quiet_pip() { grep -v -e "^WARNING: Location 'file://" -e "^\s*DEPRECATION: .* legacy 'setup.py install'" >&2 || true; }

# This machine's pip sources (find-links folders, file:// indexes such as a local wheel mirror)
# are reused inside the chroot: local folders are bind-mounted read-only at the same paths.
pip_sources() {
  local v
  PIP_FIND_LINKS_IN=$({ echo "${PIP_FIND_LINKS:-}"; "$PY" -m pip config get global.find-links 2>/dev/null || true; } |
    tr ' ' '\n' | grep -v '^$' | sort -u | tr '\n' ' ' | sed 's/ $//')
  PIP_EXTRA_INDEX_IN=$({ echo "${PIP_EXTRA_INDEX_URL:-}"; "$PY" -m pip config get global.extra-index-url 2>/dev/null || true; } |
    tr ' ' '\n' | grep -v '^$' | sort -u | tr '\n' ' ' | sed 's/ $//')
  LOCAL_PIP_DIRS=()
  for v in $PIP_FIND_LINKS_IN $PIP_EXTRA_INDEX_IN; do
    v=${v#file://}
    [[ "$v" == /* && -d "$v" ]] || continue
    # an index URL like file:///opt/pypi/simple refers to files beside it: mount its parent
    [[ "$(basename "$v")" == simple ]] && v=$(dirname "$v")
    LOCAL_PIP_DIRS+=("$v")
  done
}

# ---- project metadata ------------------------------------------------------------------------
# project_requirements [EXTRA...]: prints the version, then the requirement lines (runtime + the
# extras named; default: trainer operator).
project_requirements() {
  local extras=("$@")
  ((${#extras[@]})) || extras=(trainer operator)
  "$PY" - "$REPO_ROOT/pyproject.toml" "${extras[@]}" <<'EOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(p["version"])
reqs = list(p.get("dependencies", []))
for extra in sys.argv[2:]:
    reqs += p.get("optional-dependencies", {}).get(extra, [])
seen = set()
for r in reqs:
    if r not in seen:
        seen.add(r)
        print(r)
EOF
}

# ---- pause image --------------------------------------------------------------------------
pause_archive() { echo "$IMAGES/$(echo "$PAUSE_TAG" | tr '/:' '__').tar"; }

build_pause() {
  need_packages gcc:gcc /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev
  mkdir -p "$IMAGES"
  local out key work
  out=$(pause_archive)
  key=$(cat "$SCRIPT_DIR/pause.c" "$SCRIPT_DIR/pack_image.py" <(echo "$PAUSE_TAG") | sha256sum | cut -c1-16)
  if [[ -f "$out" && -f "$out.id" && "$(cat "$IMAGES/.pause.key" 2>/dev/null)" == "$key" ]]; then
    log "pause image cached: $out"
    return 0
  fi
  stage "pause image: gcc -static + pack"
  work=$(mktemp -d "$IMAGES/.pause.XXXXXX")
  mkdir -p "$work/rootfs"
  gcc -Os -static -s -o "$work/rootfs/pause" "$SCRIPT_DIR/pause.c"
  "${PACK[@]}" layer "$work/rootfs" "$work/layer.tar" --mtime 0 >/dev/null
  "${PACK[@]}" image --tag "$PAUSE_TAG" --layer "$work/layer.tar" --out "$out" \
    --entrypoint '["/pause"]' --user 65535:65535 --created 1970-01-01T00:00:00Z \
    --history "pause (scripts/images/pause.c, gcc -static)" >/dev/null
  echo "$key" >"$IMAGES/.pause.key"
  rm -rf "$work"
  log "pause image: $out ($(human "$out"))"
  stage ""
}

# ---- trainer image: base layer -----------------------------------------------------------------
find_local_torch_wheel() {  # find_local_torch_wheel VERSION -> path or nothing
  local d
  for d in $PIP_FIND_LINKS_IN; do
    d=${d#file://}
    [[ -d "$d" ]] || continue
    ls "$d"/torch-"$1"[-+]*cp311-cp311*linux*x86_64.whl 2>/dev/null | sort | head -n1
  done | head -n1
}

# build_base FLAVOUR DIR TORCH_WHEEL TORCH_VERSION REQ...
#   FLAVOUR trainer: torch (TORCH_WHEEL, or TORCH_VERSION from the PyTorch CPU index) + REQ.
#   FLAVOUR operator: REQ only (TORCH_WHEEL and TORCH_VERSION are ""); torch must not be there.
#   FLAVOUR cuda: torch==TORCH_VERSION + REQ from PYPI_INDEX alone (pip --isolated: no find-links, no
#     extra index, no pip config; the caller leaves PIP_FIND_LINKS_IN/PIP_EXTRA_INDEX_IN empty too);
#     fails unless torch.version.cuda is set.
# Older bases of the same flavour (siblings of DIR with the same prefix) are removed.
build_base() {
  local flavour=$1 dir=$2 torch_wheel=$3 torch_version=$4; shift 4
  local reqs=("$@") work="$dir.partial" prefix root d
  need_packages debootstrap:debootstrap
  umount_stale
  rm -rf "$work"
  mkdir -p "$work" "$IMAGES/debs"
  root="$work/rootfs"

  prefix=$(basename "$dir"); prefix=${prefix%-*}   # base, operator-base or cuda-base
  stage "$prefix: debootstrap $SUITE minbase + python3"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    --cache-dir="$IMAGES/debs" "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log" >&2; return 1; }
  log "  rootfs after debootstrap: $(du -sh -x "$root" | cut -f1)"

  stage "$prefix: venv + ${torch_version:+torch + }requirements (pip, in the chroot)"
  mount -t proc proc "$root/proc"; MOUNTS+=("$root/proc")
  mount_in "$root" /dev /dev
  # Network access for pip: the host's resolver and CA bundle (only while building).
  mount_in "$root" /etc/resolv.conf /etc/resolv.conf ro
  mount_in "$root" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt ro
  for d in "${LOCAL_PIP_DIRS[@]}"; do mount_in "$root" "$d" "$d" ro; done
  in_root "$root" python3 -m venv /opt/venv
  : >"$root/tmp/ftj-constraints.txt"
  # The GPU image's pip: PyPI only, whatever this machine's pip configuration says.
  local cuda_pip=(--isolated --no-cache-dir --disable-pip-version-check --root-user-action=ignore --timeout 180
    --index-url "$PYPI_INDEX")
  if [[ "$flavour" == operator ]]; then
    :  # no torch
  elif [[ "$flavour" == cuda ]]; then
    in_root "$root" /opt/venv/bin/pip install -q "${cuda_pip[@]}" "torch==$torch_version" 2>&1 | quiet_pip
    in_root "$root" /opt/venv/bin/python -c '
import sys, torch
print("  torch", torch.__version__, "CUDA", torch.version.cuda, file=sys.stderr)
sys.exit(0 if torch.version.cuda else f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")'
  elif [[ -n "$torch_wheel" ]]; then
    mount_in "$root" "$(dirname "$torch_wheel")" /tmp/ftj-torch ro
    in_root "$root" /opt/venv/bin/pip install -q "/tmp/ftj-torch/$(basename "$torch_wheel")" 2>&1 | quiet_pip
  else
    # No local wheel: the CPU build from PyTorch's index (PyPI's Linux wheel bundles CUDA).
    in_root "$root" /opt/venv/bin/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch==$torch_version" 2>&1 | quiet_pip
  fi
  if [[ "$flavour" != operator ]]; then
    local installed_torch
    installed_torch=$(in_root "$root" /opt/venv/bin/python -c 'import importlib.metadata as m; print(m.version("torch"))')
    echo "torch==$installed_torch" >"$root/tmp/ftj-constraints.txt"
    log "  torch $installed_torch installed (/opt/venv: $(du -sh "$root/opt/venv" | cut -f1)); now: ${reqs[*]}"
  fi
  if [[ "$flavour" == cuda ]]; then
    in_root "$root" /opt/venv/bin/pip install -q "${cuda_pip[@]}" -c /tmp/ftj-constraints.txt "${reqs[@]}" 2>&1 | quiet_pip
  else
    in_root "$root" /opt/venv/bin/pip install -q -c /tmp/ftj-constraints.txt "${reqs[@]}" 2>&1 | quiet_pip
  fi
  log "  /opt/venv: $(du -sh "$root/opt/venv" | cut -f1)"
  in_root "$root" /opt/venv/bin/pip freeze --all >"$work/freeze.txt"
  # The operator image installs nothing later (its app layer is copied in): no pip, no setuptools.
  [[ "$flavour" != operator ]] || in_root "$root" /opt/venv/bin/pip uninstall -q -y pip setuptools 2>&1 | quiet_pip
  # The non-root user every pod runs as, and its working directory.
  in_root "$root" groupadd -g 1000 finetune
  in_root "$root" useradd -u 1000 -g 1000 -d /workspace -M -s /usr/sbin/nologin finetune
  install -d -m 0755 -o 1000 -g 1000 "$root/workspace"
  umount_all

  stage "$prefix: slim + check"
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/* \
    "$root"/root/.cache "$root"/tmp/* "$root"/tmp/.[!.]* 2>/dev/null || true
  : >"$root/etc/resolv.conf"   # the kubelet / runtime provides the real one
  local before; before=$(du -sm "$root" | cut -f1)
  # Test suites shipped inside packages (pandas, numpy, scipy, sklearn, sympy, ...) are never
  # imported at run time.
  find "$root$SITE" -depth -type d -name tests -prune -exec rm -rf {} + 2>/dev/null || true
  log "  removed bundled test suites: $((before - $(du -sm "$root" | cut -f1))) MB"
  # The whole dependency set must still import.
  mount -t proc proc "$root/proc"; MOUNTS+=("$root/proc")
  if [[ "$flavour" == operator ]]; then
    # ... and nothing of the trainer's stack may have come in through a dependency.
    in_root "$root" /opt/venv/bin/python -c '
import importlib, importlib.util, sys
mods = ["kopf", "kubernetes", "pydantic", "yaml", "boto3"]
for m in mods:
    importlib.import_module(m)
heavy = [m for m in ("torch", "transformers", "datasets", "accelerate", "peft", "pyarrow", "pandas", "numpy")
         if importlib.util.find_spec(m) is not None]
if heavy:
    sys.exit(f"the operator base must not contain {heavy}")
print("imports ok:", len(mods), "modules; no torch/transformers/datasets")
' >&2
  else
  in_root "$root" /opt/venv/bin/python -c '
import importlib, sys
mods = ["torch", "transformers", "tokenizers", "accelerate", "peft", "datasets", "pyarrow", "pandas",
        "sklearn", "rouge_score", "sacrebleu", "matplotlib", "safetensors", "kopf", "kubernetes",
        "boto3", "pydantic", "yaml"]
for m in mods:
    importlib.import_module(m)
print("imports ok:", len(mods), "modules; torch", sys.modules["torch"].__version__)
' >&2
  fi
  umount_all
  rm -rf "$root"/tmp/* 2>/dev/null || true
  log "  rootfs: $(du -sh "$root" | cut -f1) (site-packages $(du -sh "$root$SITE" | cut -f1))"

  stage "$prefix: pack layer tar"
  "${PACK[@]}" layer "$root" "$work/layer.tar" --empty-dir proc --empty-dir sys --empty-dir dev >/dev/null
  date -u +%Y-%m-%dT%H:%M:%SZ >"$work/created"
  printf '%s\n' "${reqs[@]}" >"$work/requirements.txt"
  log "  $prefix layer: $(human "$work/layer.tar")"
  # Replace older bases of this flavour (a trainer base is a few GB): only the current key is kept.
  for d in "$IMAGES/$prefix"-*; do
    [[ "$d" == "$work" || ! -d "$d" ]] || rm -rf "$d"
  done
  mv "$work" "$dir"
}

# ---- app layers + archives ------------------------------------------------------------------------
trainer_archive() { echo "$IMAGES/$(echo "$TRAINER_TAG" | tr '/:' '__').tar"; }
operator_archive() { echo "$IMAGES/$(echo "$OPERATOR_TAG" | tr '/:' '__').tar"; }
trainer_gpu_archive() { echo "$IMAGES/$(echo "$TRAINER_GPU_TAG" | tr '/:' '__').tar"; }

image_tags() {  # sets VERSION, TRAINER_TAG, TRAINER_GPU_TAG and OPERATOR_TAG
  local lines
  mapfile -t lines < <(project_requirements)
  VERSION=${lines[0]}
  TRAINER_TAG="${FINETUNE_TRAINER_IMAGE:-finetune-trainer:$VERSION}"
  OPERATOR_TAG="${FINETUNE_OPERATOR_IMAGE:-finetune-operator:$VERSION}"
  TRAINER_GPU_TAG="${FINETUNE_TRAINER_GPU_IMAGE:-finetune-trainer:$VERSION-cuda}"
}

# Byte-compile what STAGING (mounted at /tmp/ftj-root in ROOT) holds, with ROOT's python: hash-checked
# pycs (reproducible; valid on a read-only root filesystem).
compile_staging() {  # compile_staging ROOT EPOCH
  SOURCE_DATE_EPOCH=$2 in_root "$1" /opt/venv/bin/python -m compileall -q \
    --invalidation-mode checked-hash -s /tmp/ftj-root -p / "/tmp/ftj-root$SITE" >/dev/null
}

write_archive() {  # write_archive TAG OUT BASE_DIR APP_LAYER TITLE BASE_HISTORY APP_HISTORY
  local tag=$1 out=$2 dir=$3 app=$4 title=$5
  "${PACK[@]}" image --tag "$tag" --out "$out" \
    --layer "$dir/layer.tar" --layer "$app" \
    --user 1000 --workdir /workspace --cmd '["python"]' --created "$(cat "$dir/created")" \
    --env "PATH=$IMAGE_PATH" --env VIRTUAL_ENV=/opt/venv --env HOME=/workspace --env LANG=C.UTF-8 \
    --env PYTHONUNBUFFERED=1 --env PYTHONDONTWRITEBYTECODE=1 \
    --label "org.opencontainers.image.title=$title" \
    --label "org.opencontainers.image.version=$VERSION" \
    --label "finetune.dev/base-key=$(basename "$dir")" \
    --history "$6" --history "$7" >/dev/null
  log "  $tag: $out ($(human "$out"); image $(cut -c1-19 "$out.id"))"
}

# build_app_layer ROOT WORK EPOCH NAME: layer 2 of a trainer image in WORK/layer.tar: the working tree's
# wheel installed (--no-deps) with ROOT's /opt/venv into WORK/root, byte-compiled. Sets APP_WHEEL.
build_app_layer() {
  local root=$1 work=$2 epoch=$3 name=$4 whl
  stage "$name app: pip wheel --no-deps . (working tree)"
  umount_stale
  rm -rf "$work"
  mkdir -p "$work/wheel" "$work/root"
  (cd "$REPO_ROOT" && "$PY" -m pip wheel -q --no-deps -w "$work/wheel" . >&2)
  whl=$(ls "$work"/wheel/*.whl)
  log "  $(basename "$whl") ($(human "$whl"))"

  stage "$name app: install into /opt/venv (layer 2)"
  mount_in "$root" "$work/wheel" /tmp/ftj-wheel ro
  mount_in "$root" "$work/root" /tmp/ftj-root
  SOURCE_DATE_EPOCH=$epoch in_root "$root" /opt/venv/bin/pip install -q --no-deps --no-index --no-compile \
    --no-warn-script-location --root /tmp/ftj-root "/tmp/ftj-wheel/$(basename "$whl")"
  compile_staging "$root" "$epoch"
  umount_all
  rmdir "$root/tmp/ftj-wheel" "$root/tmp/ftj-root" 2>/dev/null || true
  "${PACK[@]}" layer "$work/root" "$work/layer.tar" --mtime "$epoch" >/dev/null
  log "  app layer: $(human "$work/layer.tar")"
  APP_WHEEL=$whl
}

build_trainer() {
  local lines reqs torch_req torch_version torch_wheel key dir work root whl epoch
  image_tags
  mapfile -t lines < <(project_requirements trainer operator)
  reqs=("${lines[@]:1}")
  torch_req=$(printf '%s\n' "${reqs[@]}" | grep -E '^torch *==' | head -n1 || true)
  [[ -n "$torch_req" ]] || { log "pyproject.toml's [trainer] extra must pin torch (torch==X)"; return 1; }
  torch_version=$(echo "$torch_req" | sed -E 's/^torch *== *([^ ;,]+).*/\1/')
  pip_sources
  torch_wheel=$(find_local_torch_wheel "$torch_version")
  key=$({ echo "recipe=$BASE_RECIPE suite=$SUITE"; echo "torch=$(basename "${torch_wheel:-pytorch-cpu-index-$torch_version}")";
    printf '%s\n' "${reqs[@]}"; } | sha256sum | cut -c1-16)
  dir="$IMAGES/base-$key"

  if [[ -f "$dir/layer.tar" && -f "$dir/layer.tar.sha256" && -d "$dir/rootfs" ]]; then
    log "trainer base layer cached: $dir ($(human "$dir/layer.tar"))"
  else
    log "building the trainer base layer (key $key; first time 5-10 min): torch ${torch_wheel:-$torch_version from the PyTorch CPU index}"
    build_base trainer "$dir" "$torch_wheel" "$torch_version" "${reqs[@]}"
  fi
  root="$dir/rootfs"
  # A fixed time for everything in layer 2 and the config: same tree -> same image ID.
  epoch=$(date -u -d "$(cat "$dir/created")" +%s)

  work="$IMAGES/app.work"
  build_app_layer "$root" "$work" "$epoch" trainer
  whl=$APP_WHEEL

  stage "trainer image archive"
  write_archive "$TRAINER_TAG" "$(trainer_archive)" "$dir" "$work/layer.tar" finetune-trainer \
    "debootstrap $SUITE minbase, python3, /opt/venv: torch $torch_version + requirements ($(basename "$dir"))" \
    "pip install --no-deps $(basename "$whl")"
  stage ""
}

# The GPU trainer image (on demand; see the header). Its base is cached in images/cuda-base-<key>/.
build_trainer_gpu() {
  local lines reqs torch_req torch_version key dir root epoch
  image_tags
  mapfile -t lines < <(project_requirements trainer gpu operator)
  reqs=("${lines[@]:1}")
  torch_req=$(printf '%s\n' "${reqs[@]}" | grep -E '^torch *==' | head -n1 || true)
  [[ -n "$torch_req" ]] || { log "pyproject.toml's [trainer] extra must pin torch (torch==X)"; return 1; }
  torch_version=$(echo "$torch_req" | sed -E 's/^torch *== *([^ ;,]+).*/\1/')
  # None of this machine's pip sources (the CPU torch wheel folder, local mirrors): PyPI only.
  PIP_FIND_LINKS_IN="" PIP_EXTRA_INDEX_IN="" LOCAL_PIP_DIRS=()
  key=$({ echo "recipe=$CUDA_BASE_RECIPE suite=$SUITE index=$PYPI_INDEX"; echo "torch=$torch_version";
    printf '%s\n' "${reqs[@]}"; } | sha256sum | cut -c1-16)
  dir="$IMAGES/cuda-base-$key"

  if [[ -f "$dir/layer.tar" && -f "$dir/layer.tar.sha256" && -d "$dir/rootfs" ]]; then
    log "GPU trainer base layer cached: $dir ($(human "$dir/layer.tar"))"
  else
    log "building the GPU trainer base layer (key $key; several GB from $PYPI_INDEX): torch==$torch_version (CUDA)"
    build_base cuda "$dir" "" "$torch_version" "${reqs[@]}"
  fi
  root="$dir/rootfs"
  epoch=$(date -u -d "$(cat "$dir/created")" +%s)
  build_app_layer "$root" "$IMAGES/cuda-app.work" "$epoch" "GPU trainer"

  stage "GPU trainer image archive"
  write_archive "$TRAINER_GPU_TAG" "$(trainer_gpu_archive)" "$dir" "$IMAGES/cuda-app.work/layer.tar" \
    finetune-trainer-cuda \
    "debootstrap $SUITE minbase, python3, /opt/venv: torch $torch_version (PyPI, CUDA) + requirements ($(basename "$dir"))" \
    "pip install --no-deps $(basename "$APP_WHEEL")"
  stage ""
}

build_operator() {
  local lines reqs key dir work root epoch pkg
  image_tags
  mapfile -t lines < <(project_requirements operator)
  reqs=("${lines[@]:1}")
  if printf '%s\n' "${reqs[@]}" | grep -qiE '^(torch|transformers|datasets)\b'; then
    log "the runtime or [operator] requirements name torch/transformers/datasets: the operator image must not"
    return 1
  fi
  pip_sources
  key=$({ echo "recipe=$OPERATOR_BASE_RECIPE suite=$SUITE"; printf '%s\n' "${reqs[@]}"; } | sha256sum | cut -c1-16)
  dir="$IMAGES/operator-base-$key"

  if [[ -f "$dir/layer.tar" && -f "$dir/layer.tar.sha256" && -d "$dir/rootfs" ]]; then
    log "operator base layer cached: $dir ($(human "$dir/layer.tar"))"
  else
    log "building the operator base layer (key $key; first time 1-3 min): ${reqs[*]}"
    build_base operator "$dir" "" "" "${reqs[@]}"
  fi
  root="$dir/rootfs"
  epoch=$(date -u -d "$(cat "$dir/created")" +%s)

  # Only the two packages the operator imports, straight from the working tree (no wheel: it would
  # bring finetune_trainer and finetune_cli along).
  stage "operator app: finetune_api + finetune_operator (layer 2)"
  umount_stale
  work="$IMAGES/operator-app.work"
  rm -rf "$work"
  mkdir -p "$work/root$SITE"
  for pkg in api/finetune_api operator/finetune_operator; do
    cp -r "$REPO_ROOT/$pkg" "$work/root$SITE/"
  done
  find "$work/root" \( -name __pycache__ -o -name '*.pyc' \) -prune -exec rm -rf {} +
  chmod -R u=rwX,go=rX "$work/root"
  mount_in "$root" "$work/root" /tmp/ftj-root
  compile_staging "$root" "$epoch"
  # The operator must start without the trainer's stack: import it with those modules blocked.
  in_root "$root" /usr/bin/env PYTHONPATH="/tmp/ftj-root$SITE" /opt/venv/bin/python -c '
import sys
for m in ("torch", "transformers", "datasets", "finetune_trainer", "finetune_cli"):
    sys.modules[m] = None
import finetune_api, finetune_operator, finetune_operator.__main__, finetune_operator.handlers
' >&2 || { log "finetune_operator does not import in the operator image"; return 1; }
  umount_all
  rmdir "$root/tmp/ftj-root" 2>/dev/null || true
  "${PACK[@]}" layer "$work/root" "$work/layer.tar" --mtime "$epoch" >/dev/null
  log "  app layer: $(human "$work/layer.tar")"

  stage "operator image archive"
  write_archive "$OPERATOR_TAG" "$(operator_archive)" "$dir" "$work/layer.tar" finetune-operator \
    "debootstrap $SUITE minbase, python3, /opt/venv: runtime + [operator] requirements ($(basename "$dir"))" \
    "finetune_api + finetune_operator from the working tree"
  stage ""
}

# ---- sizes ---------------------------------------------------------------------------------------
print_sizes() {
  local tar
  image_tags
  printf '%-32s %12s %12s\n' image unpacked compressed
  for tar in "$(pause_archive)" "$(trainer_archive)" "$(operator_archive)" "$(trainer_gpu_archive)"; do
    [[ -f "$tar" ]] || continue
    "${PACK[@]}" sizes "$tar"
  done
}

# ---- import into containerd ----------------------------------------------------------------------
normalize_ref() {  # docker-style short names, as containerd's CRI resolves them
  local ref=$1 first=${1%%/*}
  if [[ "$ref" != */* ]]; then echo "docker.io/library/$ref"
  elif [[ "$first" == *.* || "$first" == *:* || "$first" == localhost ]]; then echo "$ref"
  else echo "docker.io/$ref"; fi
}

containerd_running() { [[ -S "$SOCK" ]] && ctr --address "$SOCK" version >/dev/null 2>&1; }

# The image ID (config digest) containerd has under REF, or nothing.
containerd_image_id() {
  local digest
  digest=$(ctr --address "$SOCK" -n k8s.io images ls "name==$(normalize_ref "$1")" 2>/dev/null | awk 'NR > 1 {print $3}')
  [[ -n "$digest" ]] || return 0
  ctr --address "$SOCK" -n k8s.io content get "$digest" 2>/dev/null |
    "$PY" -c 'import json, sys; print(json.load(sys.stdin)["config"]["digest"])' 2>/dev/null || true
}

import_archive() {  # import_archive TAR TAG
  local tar=$1 tag=$2 want have t
  [[ -f "$tar" && -f "$tar.id" ]] || { log "no cached archive for $tag ($tar)"; return 0; }
  want=$(cat "$tar.id")
  have=$(containerd_image_id "$tag")
  if [[ "$have" == "$want" ]]; then
    log "$tag already in containerd (${want:0:19})"
    return 0
  fi
  t=$SECONDS
  # Layers containerd already has (the unchanged base layer, usually) are not sent again.
  local digests
  digests=$(mktemp)
  ctr --address "$SOCK" -n k8s.io content ls -q >"$digests" 2>/dev/null || true
  log "importing $tag into containerd (k8s.io)"
  if ! "${PACK[@]}" oci-stream "$tar" --name "$(normalize_ref "$tag")" --have "$digests" |
    ctr --address "$SOCK" -n k8s.io images import - >&2; then
    log "  incremental import failed; importing the whole archive ($(human "$tar"))"
    ctr --address "$SOCK" -n k8s.io images import "$tar" >&2
  fi
  rm -f "$digests"
  have=$(containerd_image_id "$tag")
  [[ "$have" == "$want" ]] || { log "import of $tag did not take (have '${have}', want '$want')"; return 1; }
  log "  imported $tag in $((SECONDS - t))s"
}

# Image-ID references (sha256:<id>) that no tag points at any more: earlier builds of a tag. They
# would keep each old app layer alive in containerd's store.
prune_stale_ids() {
  local refs ref keep=" "
  refs=$(ctr --address "$SOCK" -n k8s.io images ls -q 2>/dev/null) || return 0
  for ref in $refs; do
    [[ "$ref" == sha256:* ]] || keep+="$(containerd_image_id "$ref") "
  done
  for ref in $refs; do
    if [[ "$ref" == sha256:* && "$keep" != *" $ref "* ]]; then
      ctr --address "$SOCK" -n k8s.io images rm "$ref" >/dev/null 2>&1 && log "removed stale image reference ${ref:0:19}"
    fi
  done
  return 0
}

import_all() {
  if [[ "${FINETUNE_NO_IMPORT:-0}" == 1 ]]; then log "FINETUNE_NO_IMPORT=1: not importing"; return 0; fi
  if ! containerd_running; then
    log "the local cluster's containerd ($SOCK) is not running: archives cached, not imported" \
      "(scripts/cluster.sh up imports them)"
    return 0
  fi
  local what=${1:-all}
  [[ -n "${TRAINER_TAG:-}" ]] || image_tags
  if [[ "$what" == all || "$what" == pause ]]; then import_archive "$(pause_archive)" "$PAUSE_TAG"; fi
  if [[ "$what" == all || "$what" == trainer ]]; then import_archive "$(trainer_archive)" "$TRAINER_TAG"; fi
  if [[ "$what" == all || "$what" == operator ]]; then import_archive "$(operator_archive)" "$OPERATOR_TAG"; fi
  # The GPU image only on request (`trainer-gpu` with FINETUNE_IMPORT_GPU_IMAGE=1), never with `all`.
  if [[ "$what" == trainer-gpu ]]; then import_archive "$(trainer_gpu_archive)" "$TRAINER_GPU_TAG"; fi
  prune_stale_ids
}

# ---- main -----------------------------------------------------------------------------------------
mkdir -p "$IMAGES"
exec 9>"$IMAGES/.lock"
if ! flock -n 9; then log "another image build holds $IMAGES/.lock; waiting"; flock 9; fi
need_packages ctr:containerd

case "${1:-all}" in
  all) build_pause; build_operator; build_trainer; stage "import"; import_all all ;;
  pause) build_pause; import_all pause ;;
  trainer) build_trainer; stage "import"; import_all trainer ;;
  operator) build_operator; stage "import"; import_all operator ;;
  trainer-gpu)
    build_trainer_gpu
    stage "GPU trainer image: check (scripts/images/check-image.sh)"
    bash "$SCRIPT_DIR/check-image.sh" "$(trainer_gpu_archive)" --cuda
    if [[ "${FINETUNE_IMPORT_GPU_IMAGE:-0}" == 1 ]]; then stage "import"; import_all trainer-gpu
    else log "not imported into the local cluster (no GPU there; FINETUNE_IMPORT_GPU_IMAGE=1 to import)"; fi ;;
  import) import_all all ;;
  sizes) print_sizes; exit 0 ;;
  *) echo "usage: $0 [all|pause|trainer|operator|trainer-gpu|import|sizes]" >&2; exit 2 ;;
esac
stage ""
log "finished in $((SECONDS - T0))s"
