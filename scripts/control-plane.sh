#!/usr/bin/env bash
# A real Kubernetes v1.20.2 control plane on this machine, for the integration
# test tier: etcd + kube-apiserver + kube-controller-manager, all on loopback.
#
#   scripts/control-plane.sh up      start (or reuse a running one); waits until ready
#   scripts/control-plane.sh down    stop every process it started, remove the state dir
#   scripts/control-plane.sh env     print `export KUBECONFIG=...`
#   scripts/control-plane.sh status  print whether it is running (exit 0 = ready)
#
# No kubelet/scheduler: pods created in this tier stay Pending, which is all the
# operator's integration tests need (Jobs -> Pods, ownerReference GC). The full
# single-node cluster (kubelet, containerd, ...) is separate work.
#
# Environment (all optional):
#   FINETUNE_STATE              state dir (certs, etcd data, logs, kubeconfigs)
#                               default /tmp/finetune-control-plane
#   FINETUNE_CACHE              binary cache root (see scripts/k8s-build.sh)
#   FINETUNE_APISERVER_ADDRESS  address the apiserver binds/advertises, default 127.0.0.1
#   FINETUNE_APISERVER_PORT     apiserver secure port, default 6543
#   FINETUNE_ETCD_CLIENT_PORT   default 2479 (not 2379, to leave a system etcd alone)
#   FINETUNE_ETCD_PEER_PORT     default 2480
#   FINETUNE_KCM_PORT           controller-manager secure (healthz) port, default 10357
#   FINETUNE_SERVICE_CIDR       default 198.19.0.0/24 (198.18.0.0/15 is reserved for
#                               test labs; never use 10.x here)
#   FINETUNE_UP_TIMEOUT         seconds `up` waits for readiness, default 120
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE="${FINETUNE_STATE:-/tmp/finetune-control-plane}"
BIN_DIR="${FINETUNE_CACHE:-$HOME/.cache/finetune}/k8s-1.20.2/bin"
ADDR="${FINETUNE_APISERVER_ADDRESS:-127.0.0.1}"
API_PORT="${FINETUNE_APISERVER_PORT:-6543}"
ETCD_CLIENT_PORT="${FINETUNE_ETCD_CLIENT_PORT:-2479}"
ETCD_PEER_PORT="${FINETUNE_ETCD_PEER_PORT:-2480}"
KCM_PORT="${FINETUNE_KCM_PORT:-10357}"
SERVICE_CIDR="${FINETUNE_SERVICE_CIDR:-198.19.0.0/24}"
UP_TIMEOUT="${FINETUNE_UP_TIMEOUT:-120}"

PKI="$STATE/pki"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
KUBECONFIG_PATH="$STATE/kubeconfig"
# Start order; `down` stops them in reverse.
COMPONENTS=(etcd kube-apiserver kube-controller-manager)

log() { echo "control-plane: $*" >&2; }

# ---- helpers ----------------------------------------------------------------------

component_bin() {
  case "$1" in
    etcd) command -v etcd || echo /usr/bin/etcd ;;
    *) echo "$BIN_DIR/$1" ;;
  esac
}

# The pid recorded for a component, if that process is still alive AND is still
# the binary we started (guards against pid reuse after a reboot/crash).
live_pid() {
  local name=$1 pidfile="$PIDS/$1.pid" pid exe
  [[ -f "$pidfile" ]] || return 1
  pid=$(<"$pidfile")
  [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 1
  exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
  [[ "$(basename "${exe% (deleted)}")" == "$name" ]] || return 1
  echo "$pid"
}

log_tail() {  # last lines of a component's log, for error messages
  local f="$LOGS/$1.log"
  if [[ -f "$f" ]]; then
    { echo "---- last 40 lines of $f ----"; tail -n 40 "$f"; } >&2
  fi
}

admin_token() { awk -F, '$2=="admin"{print $1}' "$PKI/tokens.csv"; }

# GET a path on the apiserver as admin; prints the body, fails on non-2xx.
api_get() {
  curl -fsS --max-time 5 --cacert "$PKI/ca.crt" \
    -H "Authorization: Bearer $(admin_token)" "https://$ADDR:$API_PORT$1"
}

is_ready() {
  local c
  for c in "${COMPONENTS[@]}"; do live_pid "$c" >/dev/null || return 1; done
  [[ -f "$KUBECONFIG_PATH" ]] && [[ "$(api_get /readyz 2>/dev/null)" == "ok" ]]
}

# Start a component detached: setsid so it survives the caller (pytest's
# subprocess, a terminal's Ctrl-C) and has no controlling terminal.
start() {
  local name=$1; shift
  local bin; bin=$(component_bin "$name")
  log "starting $name (log: $LOGS/$name.log)"
  # 8>&-: do not let the daemon inherit the `up` lock (it would hold it forever).
  setsid "$bin" "$@" >"$LOGS/$name.log" 2>&1 </dev/null 8>&- &
  echo $! >"$PIDS/$name.pid"
}

# Wait until `check` succeeds; fail early (with the log) if the component died.
wait_for() {
  local what=$1 component=$2 check=$3 deadline=$((SECONDS + UP_TIMEOUT))
  until eval "$check" >/dev/null 2>&1; do
    if ! live_pid "$component" >/dev/null; then
      log "$component exited while waiting for: $what"
      log_tail "$component"
      return 1
    fi
    if (( SECONDS >= deadline )); then
      log "timed out after ${UP_TIMEOUT}s waiting for: $what"
      log_tail "$component"
      return 1
    fi
    sleep 0.5
  done
  log "ready: $what (+${SECONDS}s)"
}

port_free() {  # true when nothing listens on TCP port $1
  ! ss -Htln "sport = :$1" | grep -q .
}

# ---- certificates, tokens, kubeconfigs ----------------------------------------------

make_pki() {
  mkdir -p "$PKI"
  # Cluster CA: signs the apiserver's serving cert; also handed to the
  # controller-manager as --root-ca-file (it goes into SA token secrets).
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -subj "/CN=finetune-local-ca" -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null

  # apiserver serving cert. IP SANs: loopback, the bind address, and the first IP
  # of the service range (the `kubernetes` Service's ClusterIP, for in-cluster clients).
  local a b c d svc_ip
  IFS=. read -r a b c d <<<"${SERVICE_CIDR%/*}"
  svc_ip="$a.$b.$c.$((d + 1))"
  cat >"$PKI/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:127.0.0.1,IP:$ADDR,IP:$svc_ip,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
  openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=kube-apiserver" \
    -keyout "$PKI/apiserver.key" -out "$PKI/apiserver.csr" 2>/dev/null
  openssl x509 -req -sha256 -days 3650 -in "$PKI/apiserver.csr" \
    -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" -CAcreateserial \
    -extfile "$PKI/apiserver.ext" -out "$PKI/apiserver.crt" 2>/dev/null

  # Service-account token signing key pair (apiserver signs/verifies, the
  # controller-manager signs the legacy token secrets).
  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null

  # Static bearer tokens (--token-auth-file): token,user,uid,"groups".
  # admin is a cluster superuser via system:masters; the controller-manager and
  # scheduler users get their RBAC bootstrap roles by user name.
  {
    echo "$(openssl rand -hex 32),admin,admin,\"system:masters\""
    echo "$(openssl rand -hex 32),system:kube-controller-manager,system:kube-controller-manager"
    echo "$(openssl rand -hex 32),system:kube-scheduler,system:kube-scheduler"
  } >"$PKI/tokens.csv"
  chmod 600 "$PKI"/*.key "$PKI/tokens.csv"
}

write_kubeconfig() {  # path user
  local path=$1 user=$2 token
  token=$(awk -F, -v u="$user" '$2==u{print $1}' "$PKI/tokens.csv")
  # CA embedded so the file works when copied elsewhere.
  cat >"$path.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: finetune-local
  cluster:
    server: https://$ADDR:$API_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    token: $token
contexts:
- name: finetune-local
  context:
    cluster: finetune-local
    user: $user
    namespace: default
current-context: finetune-local
EOF
  chmod 600 "$path.tmp"
  mv "$path.tmp" "$path"
}

# ---- commands ------------------------------------------------------------------------

cmd_up() {
  SECONDS=0
  mkdir -p "$(dirname "$STATE")"
  # One `up`/`down` at a time (parallel pytest workers, a developer + CI).
  exec 8>"$STATE.lock"
  flock 8

  if is_ready; then
    log "already running and ready (state: $STATE)"
    cmd_env
    return 0
  fi
  # Partially running or left over (crash, reboot, state dir deleted under
  # running processes): clear it all and start from scratch.
  [[ -d "$STATE" ]] && log "found a stale/partial control plane in $STATE; replacing it"
  stop_all remove-state

  # Binaries: build them if the cache is empty (slow the first time only).
  local b
  for b in kube-apiserver kube-controller-manager kubectl; do
    if [[ ! -x "$BIN_DIR/$b" ]]; then
      log "$BIN_DIR/$b missing; running scripts/k8s-build.sh (~7 min the first time)"
      bash "$SCRIPT_DIR/k8s-build.sh" >&2
      break
    fi
  done
  command -v etcd >/dev/null || { log "etcd not installed (apt-get install etcd-server; k8s-build.sh does it)"; exit 1; }

  local p
  for p in "$ETCD_CLIENT_PORT" "$ETCD_PEER_PORT" "$API_PORT" "$KCM_PORT"; do
    port_free "$p" || { log "TCP port $p is already in use; set the FINETUNE_*_PORT variables"; ss -Htlnp "sport = :$p" >&2; exit 1; }
  done

  mkdir -p "$STATE" "$PIDS" "$LOGS"
  chmod 700 "$STATE"
  # A failed `up` must not leave half a control plane running (nobody would
  # call `down` for it); the logs stay in $STATE/logs for the error report.
  trap 'log "up failed; stopping what was started (logs kept in $LOGS)"; stop_all keep-state' ERR
  make_pki
  write_kubeconfig "$KUBECONFIG_PATH" admin
  write_kubeconfig "$STATE/kube-controller-manager.kubeconfig" system:kube-controller-manager
  write_kubeconfig "$STATE/kube-scheduler.kubeconfig" system:kube-scheduler
  log "certificates and kubeconfigs written (+${SECONDS}s)"

  # etcd: own data dir, loopback only, plain http (nothing leaves the machine).
  start etcd \
    --name finetune \
    --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "finetune=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-state new
  wait_for "etcd /health" etcd "curl -fsS --max-time 2 http://127.0.0.1:$ETCD_CLIENT_PORT/health | grep -q true"

  # kube-apiserver. Notes on 1.20-specific flags:
  #  --insecure-port=0: 1.20 still opens an unauthenticated port 8080 by default.
  #  --service-account-issuer/--service-account-signing-key-file: required since 1.20
  #    (TokenRequest); --service-account-key-file verifies tokens (legacy + bound).
  #  --cert-dir: otherwise it tries /var/run/kubernetes.
  #  --kubelet-preferred-address-types: reach kubelets by IP (no DNS here), for later node work.
  start kube-apiserver \
    --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address "$ADDR" \
    --advertise-address "$ADDR" \
    --secure-port "$API_PORT" \
    --insecure-port 0 \
    --cert-dir "$STATE/apiserver-certs" \
    --tls-cert-file "$PKI/apiserver.crt" \
    --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --token-auth-file "$PKI/tokens.csv" \
    --authorization-mode Node,RBAC \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --allow-privileged=true \
    --kubelet-preferred-address-types InternalIP,Hostname \
    --profiling=false \
    --v 1
  # shellcheck disable=SC2016  # evaluated later by wait_for, on purpose
  wait_for "kube-apiserver /readyz" kube-apiserver '[[ "$(api_get /readyz)" == ok ]]'

  # kube-controller-manager: runs the Job controller, garbage collector,
  # serviceaccount + token controllers (default SA and its token secret), ...
  #  --controllers '*,-nodeipam': no pod CIDRs to allocate here.
  #  --leader-elect=false: single instance; skips the lease acquisition delay.
  #  --port=0: 1.20 still opens an insecure healthz port 10252 by default.
  #  --use-service-account-credentials: each controller acts as its own SA (as in
  #    real clusters), so RBAC problems show up here too.
  start kube-controller-manager \
    --kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --controllers '*,-nodeipam' \
    --leader-elect=false \
    --bind-address 127.0.0.1 \
    --secure-port "$KCM_PORT" \
    --port 0 \
    --cert-dir "$STATE/kcm-certs" \
    --profiling=false \
    --v 1

  # Pods are admitted only once their ServiceAccount has a token secret (1.20's
  # ServiceAccount admission without BoundServiceAccountTokenVolume), so wait for
  # the `default` SA in `default` to have one: the controllers are then working.
  wait_for "serviceaccount default/default with a token secret" kube-controller-manager \
    "api_get /api/v1/namespaces/default/serviceaccounts/default | grep -q '\"secrets\"'"

  trap - ERR
  log "up in ${SECONDS}s; state dir $STATE"
  cmd_env
}

# Processes of ours whose pid file is gone (state dir partly deleted, e.g. by a
# /tmp cleaner): recognised by their binary name AND a command line that names
# this state dir, so nothing else on the machine is ever matched.
orphan_pids() {
  local name=$1 d exe
  for d in /proc/[0-9]*; do
    exe=$(readlink "$d/exe" 2>/dev/null) || continue
    [[ "$(basename "${exe% (deleted)}")" == "$name" ]] || continue
    tr '\0' '\n' <"$d/cmdline" 2>/dev/null | grep -qF -- "$STATE/" && echo "${d#/proc/}"
  done
  return 0
}

# Stop all our processes (TERM, then KILL after 10s) and remove the state dir
# ($1: remove-state, or keep-state so that a failed `up` leaves its logs).
stop_all() {
  local i name pid pids=()
  for (( i=${#COMPONENTS[@]}-1; i>=0; i-- )); do
    name=${COMPONENTS[i]}
    for pid in $( { live_pid "$name" || true; orphan_pids "$name"; } | sort -u); do
      log "stopping $name (pid $pid)"
      kill -TERM "$pid" 2>/dev/null || true
      pids+=("$pid")
    done
  done
  for pid in "${pids[@]}"; do
    for (( i=0; i<100; i++ )); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  if [[ "$1" == remove-state ]]; then rm -rf "$STATE"; fi
}

cmd_down() {
  mkdir -p "$(dirname "$STATE")"
  exec 8>"$STATE.lock"
  flock 8
  stop_all remove-state
  log "down (removed $STATE)"
}

cmd_env() {
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
}

cmd_status() {
  if is_ready; then
    echo "running: https://$ADDR:$API_PORT (KUBECONFIG=$KUBECONFIG_PATH)"
  else
    echo "not running (state dir: $STATE)"
    return 1
  fi
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env ;;
  status) cmd_status ;;
  *) echo "usage: $0 {up|down|env|status}" >&2; exit 2 ;;
esac
