#!/usr/bin/env bash
# Check a trainer image archive (from scripts/images/build.sh) the way a node would run it, without a
# container runtime and without a GPU: unpack its layers in order into a scratch root filesystem, read its
# config, and run Python in a chroot as the image's user with the image's environment and working directory.
#
#   scripts/images/check-image.sh ARCHIVE [--cuda]
#
# Checks (any failure exits non-zero; informational lines are marked "info"):
#   config  User is numeric and not 0 (kubelet's runAsNonRoot check needs a numeric user), WorkingDir is
#           /workspace, PATH starts with /opt/venv/bin; compared with the CPU trainer image's config when
#           that archive is cached beside it.
#   files   /workspace owned by 1000; setuid/setgid files listed (info: a restricted pod runs with
#           allowPrivilegeEscalation=false, i.e. no_new_privs, so they cannot raise privileges; nothing at
#           run time needs them).
#   python  as the image user: torch (version, torch.version.cuda, cuda.is_available()), transformers, peft,
#           deepspeed (import + its accelerator), `python -m finetune_trainer --help`,
#           `python -m finetune_trainer.preflight --help`; with --cuda also: torch.version.cuda is set and
#           bitsandbytes imports. ds_report runs as info only (it looks for nvcc, which a runtime image lacks).
# The scratch root is removed afterwards (FINETUNE_CHECK_KEEP=1 keeps it and prints where).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/../.." && pwd)
if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"; else PY=python3; fi

ARCHIVE=${1:?usage: $0 ARCHIVE [--cuda]}
CUDA=0
[[ "${2:-}" == --cuda ]] && CUDA=1
[[ -f "$ARCHIVE" ]] || { echo "check: no archive $ARCHIVE" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || { echo "check: must run as root (chroot)" >&2; exit 1; }

log() { echo "check: $*" >&2; }
FAILED=0
fail() { log "FAIL: $*"; FAILED=1; }

SCRATCH=$(mktemp -d "$(dirname "$ARCHIVE")/.check.XXXXXX")
ROOT="$SCRATCH/rootfs"
cleanup() {
  umount -l "$ROOT/proc" 2>/dev/null || true
  umount -l "$ROOT/dev" 2>/dev/null || true
  if [[ "${FINETUNE_CHECK_KEEP:-0}" == 1 ]]; then log "kept $ROOT"; else rm -rf "$SCRATCH"; fi
}
trap cleanup EXIT

# ---- config ---------------------------------------------------------------------------------------------
# Prints: the layer paths (one a line), then a line "--", then KEY=VALUE lines of the config.
"$PY" - "$ARCHIVE" >"$SCRATCH/config.txt" <<'EOF'
import json, sys, tarfile
with tarfile.open(sys.argv[1], "r:") as t:
    entry = json.load(t.extractfile("manifest.json"))[0]
    cfg = json.load(t.extractfile(entry["Config"]))["config"]
for layer in entry["Layers"]:
    print(layer)
print("--")
print("TAG=" + entry["RepoTags"][0])
print("USER=" + cfg.get("User", ""))
print("WORKDIR=" + cfg.get("WorkingDir", ""))
print("CMD=" + json.dumps(cfg.get("Cmd")))
print("ENTRYPOINT=" + json.dumps(cfg.get("Entrypoint")))
for e in cfg.get("Env", []):
    print("ENV=" + e)
EOF
mapfile -t LAYERS < <(sed '/^--$/q' "$SCRATCH/config.txt" | grep -v '^--$')
conf() { sed -n "s/^$1=//p" "$SCRATCH/config.txt"; }
TAG=$(conf TAG) USER_CFG=$(conf USER) WORKDIR=$(conf WORKDIR)
mapfile -t ENVS < <(conf ENV)
log "image $TAG: ${#LAYERS[@]} layers; User=$USER_CFG WorkingDir=$WORKDIR Cmd=$(conf CMD) Entrypoint=$(conf ENTRYPOINT)"
log "  Env: ${ENVS[*]}"
[[ "$USER_CFG" =~ ^[0-9]+(:[0-9]+)?$ && "${USER_CFG%%:*}" != 0 ]] ||
  fail "image User '$USER_CFG' is not a numeric non-root uid (runAsNonRoot could not be verified)"
[[ "$WORKDIR" == /workspace ]] || fail "WorkingDir is '$WORKDIR', not /workspace"
printf '%s\n' "${ENVS[@]}" | grep -q '^PATH=/opt/venv/bin:' || fail "PATH does not start with /opt/venv/bin"
CPU_ARCHIVE="$(dirname "$ARCHIVE")/$(echo "${TAG%-cuda}" | tr '/:' '__').tar"
if [[ "$CPU_ARCHIVE" != "$ARCHIVE" && -f "$CPU_ARCHIVE" ]]; then
  if "$PY" - "$ARCHIVE" "$CPU_ARCHIVE" <<'EOF'
import json, sys, tarfile
def cfg(path):
    with tarfile.open(path, "r:") as t:
        entry = json.load(t.extractfile("manifest.json"))[0]
        c = json.load(t.extractfile(entry["Config"]))["config"]
    return {k: c.get(k) for k in ("User", "WorkingDir", "Env", "Cmd", "Entrypoint")}
a, b = cfg(sys.argv[1]), cfg(sys.argv[2])
diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
print("check:   config (User, WorkingDir, Env, Cmd, Entrypoint) vs", sys.argv[2].rsplit("/", 1)[-1] + ":",
      "identical" if not diff else f"differs: {diff}", file=sys.stderr)
sys.exit(1 if diff else 0)
EOF
  then :; else fail "config differs from the CPU trainer image's"; fi
fi

# ---- unpack ---------------------------------------------------------------------------------------------
t=$SECONDS
mkdir -p "$ROOT"
for layer in "${LAYERS[@]}"; do
  tar -xOf "$ARCHIVE" "$layer" | tar -x -p --numeric-owner -C "$ROOT"
done
log "unpacked in $((SECONDS - t))s: $(du -sh "$ROOT" | cut -f1) on disk"
SITE=$(echo "$ROOT"/opt/venv/lib/python3*/site-packages)
log "  info: largest in site-packages: $(du -sm "$SITE"/* 2>/dev/null | sort -rn | head -n 8 |
  awk '{n = $2; sub(".*/", "", n); printf "%s %d MB, ", n, $1}')"
[[ -d "$SITE/nvidia" ]] && log "  info: CUDA runtime wheels (site-packages/nvidia): $(du -sh "$SITE/nvidia" | cut -f1):" \
  "$(ls "$SITE/nvidia" | tr '\n' ' ')"

# ---- files ----------------------------------------------------------------------------------------------
owner=$(stat -c '%u:%g %a' "$ROOT/workspace" 2>/dev/null || echo missing)
[[ "$owner" == "1000:1000 "* ]] || fail "/workspace is '$owner', not owned by 1000:1000"
log "  /workspace: $owner (uid:gid mode)"
suid=$(cd "$ROOT" && find . -xdev -type f -perm /6000 -printf '%m %p\n' | sed 's| \./| /|' | sort -k2)
log "  info: setuid/setgid files ($(echo -n "$suid" | grep -c . || true)); a restricted pod (allowPrivilegeEscalation:" \
  "false) cannot use them, and nothing the trainer runs needs them:"
echo "$suid" | sed 's/^/check:     /' >&2

# ---- python, as the image user ----------------------------------------------------------------------------
mkdir -p "$ROOT/proc" "$ROOT/dev"
mount -t proc proc "$ROOT/proc"
mount --bind /dev "$ROOT/dev"
run_as_image() {  # run_as_image CMD... : in the image, as its User, in its WorkingDir, with its Env only
  chroot --userspec="${USER_CFG%%:*}:${USER_CFG#*:}" "$ROOT" /usr/bin/env -i -C "$WORKDIR" "${ENVS[@]}" "$@"
}
[[ "$USER_CFG" == *:* ]] || USER_CFG="$USER_CFG:$USER_CFG"
log "  running as $(run_as_image id)"
step() {  # step NAME FATAL CMD...: run, show its output (stdout and stderr), record a failure if FATAL
  local name=$1 fatal=$2 rc=0 out; shift 2
  out=$(run_as_image timeout 600 "$@" 2>&1) || rc=$?
  log "--- $name (rc=$rc)"
  echo "$out" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^/  | /' >&2
  if ((rc != 0)) && [[ "$fatal" == fatal ]]; then fail "$name exited $rc"; fi
  return 0
}
step torch fatal python -c '
import sys, torch
print("torch", torch.__version__, "| torch.version.cuda", torch.version.cuda, "| cuda.is_available()",
      torch.cuda.is_available(), "| device_count", torch.cuda.device_count())
try:
    print("compiled for:", torch._C._cuda_getArchFlags())
except Exception as e:
    print("compiled for: n/a", type(e).__name__)
try:
    print("cuDNN", torch.backends.cudnn.version(), "| NCCL", torch.cuda.nccl.version())
except Exception as e:
    print("cuDNN/NCCL version: n/a without a GPU:", type(e).__name__, e)
if sys.argv[1] == "1" and not torch.version.cuda:
    sys.exit("torch is not a CUDA build")
x = torch.randn(64, 64)
print("CPU matmul ok:", tuple((x @ x).shape))
' "$CUDA"
step transformers+peft fatal python -c '
import transformers, peft, accelerate, datasets
print("transformers", transformers.__version__, "| peft", peft.__version__, "| accelerate", accelerate.__version__,
      "| datasets", datasets.__version__)'
if ((CUDA)); then
  step bitsandbytes fatal python -c '
import bitsandbytes as bnb
print("bitsandbytes", bnb.__version__, "imported")
import bitsandbytes.functional, bitsandbytes.optim
print("bitsandbytes.optim.AdamW8bit:", bnb.optim.AdamW8bit.__name__)'
fi
step deepspeed fatal python -c '
import deepspeed
from deepspeed.accelerator import get_accelerator
acc = get_accelerator()
print("deepspeed", deepspeed.__version__, "| accelerator", acc.device_name(), "| communication backend",
      acc.communication_backend_name())'
step "ds_report (info)" info ds_report
step "python -m finetune_trainer --help" fatal python -m finetune_trainer --help
step "python -m finetune_trainer.preflight --help" fatal python -m finetune_trainer.preflight --help

if ((FAILED)); then log "$TAG: FAILED"; exit 1; fi
log "$TAG: all checks passed (no GPU here: nothing ran on a GPU)"
