#!/usr/bin/env bash
# A real single-node Kubernetes v1.20.2 cluster on this machine, for the e2e tier and the demo:
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler, containerd + runc + CNI bridge,
# kubelet, kube-proxy (iptables), and an S3 server (moto) — no Docker, no kind, no registry.
#
#   scripts/cluster.sh up       start (or reuse) it; waits until the node is Ready, the default
#                               ServiceAccount has its token and Services work; prints the env
#   scripts/cluster.sh down     stop every process it started; remove its mounts, network
#                               interfaces, iptables chains, cgroups and state (images stay cached)
#   scripts/cluster.sh env      print `export KUBECONFIG=...` and `export FINETUNE_S3_ENDPOINT=...`
#   scripts/cluster.sh status   print what runs (exit 0 = ready)
#
# If KUBECONFIG already points at a reachable cluster with a Ready node that is not this one,
# `up` and `env` say so and leave everything alone: the demo and the e2e tests then use that
# cluster (images must be available there; S3 from FINETUNE_S3_ENDPOINT). Unset KUBECONFIG to
# get the local cluster instead.
#
# Layout (defaults; see docs/local-cluster.md):
#   bridge ftj0 198.18.100.1/24 = the node address (kubelet InternalIP, apiserver, S3 server);
#   pods get 198.18.100.10-250 from CNI host-local; Services 198.19.100.0/24 (the `kubernetes`
#   Service is 198.19.100.1 -> 198.18.100.1:6443). 198.18.0.0/15 is reserved for network test
#   labs: never routed, never 10.x. Pods cannot reach beyond this machine (FINETUNE-FORWARD
#   chain) and have no DNS (there is no CoreDNS): use Service environment variables / IPs.
#   S3 (moto, in memory, any credentials): http://198.18.100.1:9000 from pods and this machine.
#   State (certs, etcd, kubelet root, containerd state, logs): $FINETUNE_CLUSTER_STATE.
#   containerd's image store: $FINETUNE_CACHE/containerd (kept across down/up, so imported
#   images stay; `rm -rf` it after `down` to drop them).
#   Binaries: scripts/k8s-build.sh's cache; images: scripts/images/build.sh.
#
# Environment (all optional):
#   FINETUNE_CLUSTER_STATE   state dir (default /tmp/finetune-cluster)
#   FINETUNE_CACHE           cache root (default $HOME/.cache/finetune)
#   FINETUNE_UP_TIMEOUT      seconds each readiness wait may take (default 120)
#   FINETUNE_PYTHON          Python with moto[server] (default <repo>/.venv/bin/python)
#   FINETUNE_PAUSE_IMAGE     CRI sandbox image (default registry.k8s.io/pause:3.6)
#   FINETUNE_KUBELET_PORT    the kubelet's port (default 10650)
#
# Coexists with scripts/control-plane.sh (integration tier): different state dir, ports
# (etcd 2579/2580, apiserver 198.18.100.1:6443, controller-manager 10457, scheduler 10459,
# kubelet 10650/10648, kube-proxy 10649/10656, S3 9000) and Service range.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
STATE="${FINETUNE_CLUSTER_STATE:-/tmp/finetune-cluster}"
CACHE="${FINETUNE_CACHE:-$HOME/.cache/finetune}"
BIN_DIR="$CACHE/k8s-1.20.2/bin"
# The cluster's own kubectl (scripts/k8s-build.sh) when it is built, else the host's.
KUBECTL="$BIN_DIR/kubectl"
[[ -x "$KUBECTL" ]] || KUBECTL=kubectl
CONTAINERD_ROOT="$CACHE/containerd"
UP_TIMEOUT="${FINETUNE_UP_TIMEOUT:-120}"
PYTHON="${FINETUNE_PYTHON:-$REPO_ROOT/.venv/bin/python}"
PAUSE_IMAGE="${FINETUNE_PAUSE_IMAGE:-registry.k8s.io/pause:3.6}"

BRIDGE=ftj0
NODE_IP=198.18.100.1
POD_CIDR=198.18.100.0/24
POD_RANGE_START=198.18.100.10
POD_RANGE_END=198.18.100.250
SERVICE_CIDR=198.19.100.0/24
SERVICE_IP=198.19.100.1          # the `kubernetes` Service
NODE_NAME=finetune-node
API_PORT=6443
ETCD_CLIENT_PORT=2579
ETCD_PEER_PORT=2580
KCM_PORT=10457
SCHED_PORT=10459
# The kubelet's port can be moved when another tool on this machine holds 10650.
KUBELET_PORT=${FINETUNE_KUBELET_PORT:-10650}
KUBELET_HEALTHZ_PORT=10648
PROXY_METRICS_PORT=10649
PROXY_HEALTHZ_PORT=10656
S3_PORT=9000
S3_ENDPOINT="http://$NODE_IP:$S3_PORT"
FWD_CHAIN=FINETUNE-FORWARD

PKI="$STATE/pki"
PIDS="$STATE/pids"
LOGS="$STATE/logs"
CONF="$STATE/conf"
HOST_RECORD="$CACHE/cluster-host"   # what `up` changed on the host (see save_host_state)
KUBECONFIG_PATH="$STATE/kubeconfig"
SOCK="$STATE/containerd/containerd.sock"
# Start order; `down` stops them in reverse.
COMPONENTS=(containerd etcd s3 kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
# Every daemon we start carries this in its environment: how `down` finds our processes even
# when the pid files are gone (containerd's shims inherit it too).
MARK="FINETUNE_CLUSTER_MARK=$STATE"
# Kernel settings the kubelet, kube-proxy and the CNI bridge change; `down` restores them.
SYSCTLS=(net/ipv4/ip_forward net/bridge/bridge-nf-call-iptables net/ipv4/conf/all/route_localnet
  vm/overcommit_memory vm/panic_on_oom kernel/panic kernel/panic_on_oops
  kernel/keys/root_maxkeys kernel/keys/root_maxbytes)
# Host paths that the kubelet / containerd create outside the state dir (hard-coded there);
# `up` records which of them did not exist, `down` removes those.
HOST_PATHS=(/var/log/pods /var/log/containers /var/lib/kubelet /var/lib/cni /run/containerd)

log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

# ---- process helpers ------------------------------------------------------------------------------

proc_start_time() {  # field 22 of /proc/PID/stat: distinguishes a reused pid; fails for a zombie
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  # shellcheck disable=SC2086
  set -- $s
  [[ "$1" != Z ]] || return 1
  echo "${20}"
}

live_pid() {  # the pid recorded for a component, if that very process still runs
  local f="$PIDS/$1.pid" pid start
  [[ -f "$f" ]] || return 1
  read -r pid start <"$f" || true
  [[ -n "${pid:-}" && "$(proc_start_time "$pid" 2>/dev/null)" == "${start:-x}" ]] || return 1
  echo "$pid"
}

marked_pids() {  # every process (ours) whose environment carries $MARK
  local d
  for d in /proc/[0-9]*; do
    grep -qszxF -- "$MARK" "$d/environ" && echo "${d#/proc/}"
  done
  return 0
}

log_tail() {
  local f="$LOGS/$1.log"
  [[ -f "$f" ]] && { echo "---- last 40 lines of $f ----"; tail -n 40 "$f"; } >&2 || true
}

start() {  # start NAME BINARY ARGS...: detached (setsid), logs in $LOGS/NAME.log
  local name=$1 bin=$2 pid; shift 2
  log "starting $name (log: $LOGS/$name.log)"
  # 8>&-: the daemon must not inherit the `up` lock.
  env "$MARK" setsid "$bin" "$@" >"$LOGS/$name.log" 2>&1 </dev/null 8>&- &
  pid=$!
  echo "$pid $(proc_start_time "$pid")" >"$PIDS/$name.pid"
}

wait_for() {  # wait_for WHAT COMPONENT CHECK
  local what=$1 component=$2 check=$3 deadline=$((SECONDS + UP_TIMEOUT))
  until eval "$check" >/dev/null 2>&1; do
    if ! live_pid "$component" >/dev/null; then
      log "$component exited while waiting for: $what"
      log_tail "$component"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "timed out after ${UP_TIMEOUT}s waiting for: $what"
      log_tail "$component"
      return 1
    fi
    sleep 0.5
  done
  log "ready: $what (+${SECONDS}s)"
}

port_in_use() { ss -Htln "sport = :$1" | grep -q .; }

# ---- API helpers --------------------------------------------------------------------------------------

token_of() { awk -F, -v u="$1" '$2==u {print $1}' "$PKI/tokens.csv"; }

api_get() {  # GET a path as admin; prints the body, fails on non-2xx
  curl -fsS --max-time 5 --cacert "$PKI/ca.crt" \
    -H "Authorization: Bearer $(token_of admin)" "https://$NODE_IP:$API_PORT$1"
}

node_ready() {
  api_get "/api/v1/nodes/$NODE_NAME" |
    jq -e '(.status.conditions[] | select(.type == "Ready") | .status == "True")
           and ([.spec.taints[]? | select(.key | startswith("node.kubernetes.io/"))] | length == 0)' >/dev/null
}

sa_token_ready() {
  api_get /api/v1/namespaces/default/serviceaccounts/default | jq -e '(.secrets // []) | length > 0' >/dev/null
}

services_programmed() {  # kube-proxy has written the `kubernetes` Service's rules
  iptables -w -t nat -S KUBE-SERVICES 2>/dev/null | grep -q -- "-d $SERVICE_IP/32"
}

s3_ready() { curl -fsS --max-time 2 -o /dev/null "$S3_ENDPOINT/"; }

is_ready() {
  local c
  for c in "${COMPONENTS[@]}"; do live_pid "$c" >/dev/null || return 1; done
  [[ -f "$KUBECONFIG_PATH" ]] && [[ "$(api_get /readyz 2>/dev/null)" == ok ]] && node_ready && s3_ready
}

# ---- a cluster that is not ours -----------------------------------------------------------------

# True when KUBECONFIG names another cluster that answers and has a Ready node: that one is used.
foreign_cluster() {
  local kc=${KUBECONFIG:-} ready
  [[ -n "$kc" && "$kc" != "$KUBECONFIG_PATH" ]] || return 1
  if ! KUBECONFIG="$kc" timeout 15 "$KUBECTL" --request-timeout=5s get --raw /readyz >/dev/null 2>&1; then
    log "KUBECONFIG=$kc does not answer; ignoring it (using the local cluster)"
    return 1
  fi
  ready=$(KUBECONFIG="$kc" timeout 15 "$KUBECTL" --request-timeout=5s get nodes -o json 2>/dev/null |
    jq '[.items[] | select(any(.status.conditions[]; .type == "Ready" and .status == "True"))] | length' 2>/dev/null || echo 0)
  if [[ "${ready:-0}" -eq 0 ]]; then
    log "KUBECONFIG=$kc answers but has no Ready node (scripts/control-plane.sh's?); ignoring it (using the local cluster)"
    return 1
  fi
  return 0
}

foreign_env() {
  log "KUBECONFIG=$KUBECONFIG points at a reachable cluster with a Ready node that is not the local one;"
  log "leaving it alone and using it (unset KUBECONFIG to use the local cluster instead)"
  echo "export KUBECONFIG=$KUBECONFIG"
  if [[ -n "${FINETUNE_S3_ENDPOINT:-}" ]]; then
    echo "export FINETUNE_S3_ENDPOINT=$FINETUNE_S3_ENDPOINT"
  else
    log "FINETUNE_S3_ENDPOINT is not set: say where that cluster's pods reach S3"
  fi
}

# ---- packages and binaries ------------------------------------------------------------------------

ensure_packages() {
  local spec missing=()
  # command-or-path:package
  for spec in containerd:containerd runc:runc /usr/lib/cni/bridge:containernetworking-plugins \
    iptables:iptables conntrack:conntrack etcd:etcd-server openssl:openssl jq:jq curl:curl \
    gcc:gcc /usr/lib/x86_64-linux-gnu/libc.a:libc6-dev ss:iproute2; do
    [[ -e "${spec%%:*}" ]] || command -v "${spec%%:*}" >/dev/null 2>&1 || missing+=("${spec#*:}")
  done
  ((${#missing[@]})) || return 0
  log "installing Debian packages: ${missing[*]}"
  local apt=(apt-get -y -q -o DPkg::Lock::Timeout=900 -o Acquire::Retries=3)
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" update >&2
  DEBIAN_FRONTEND=noninteractive "${apt[@]}" install --no-install-recommends "${missing[@]}" >&2
}

ensure_binaries() {
  local b
  for b in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    if [[ ! -x "$BIN_DIR/$b" ]]; then
      log "$BIN_DIR/$b missing: running scripts/k8s-build.sh (10-15 min the first time)"
      bash "$SCRIPT_DIR/k8s-build.sh" >&2
      return
    fi
  done
}

# ---- certificates, tokens, kubeconfigs -------------------------------------------------------------

make_pki() {
  mkdir -p "$PKI"
  openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 3650 \
    -subj "/CN=finetune-cluster-ca" -keyout "$PKI/ca.key" -out "$PKI/ca.crt" 2>/dev/null

  # apiserver serving cert: the node address, loopback and the `kubernetes` Service ClusterIP.
  cat >"$PKI/apiserver.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=IP:$NODE_IP,IP:$SERVICE_IP,IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
EOF
  sign_cert apiserver "/CN=kube-apiserver" "$PKI/apiserver.ext"

  # The apiserver's client cert towards the kubelet (logs, exec): a cluster admin.
  cat >"$PKI/kubelet-client.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth
EOF
  sign_cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "$PKI/kubelet-client.ext"

  openssl genrsa -out "$PKI/sa.key" 2048 2>/dev/null
  openssl rsa -in "$PKI/sa.key" -pubout -out "$PKI/sa.pub" 2>/dev/null

  # Static bearer tokens: token,user,uid,"groups".
  {
    echo "$(openssl rand -hex 32),admin,admin,\"system:masters\""
    echo "$(openssl rand -hex 32),system:kube-controller-manager,system:kube-controller-manager"
    echo "$(openssl rand -hex 32),system:kube-scheduler,system:kube-scheduler"
    echo "$(openssl rand -hex 32),system:kube-proxy,system:kube-proxy"
    echo "$(openssl rand -hex 32),system:node:$NODE_NAME,system:node:$NODE_NAME,\"system:nodes\""
  } >"$PKI/tokens.csv"
  chmod 600 "$PKI"/*.key "$PKI/tokens.csv"
}

sign_cert() {  # sign_cert NAME SUBJECT EXTFILE
  openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "$2" \
    -keyout "$PKI/$1.key" -out "$PKI/$1.csr" 2>/dev/null
  openssl x509 -req -sha256 -days 3650 -in "$PKI/$1.csr" -CA "$PKI/ca.crt" -CAkey "$PKI/ca.key" \
    -CAcreateserial -extfile "$3" -out "$PKI/$1.crt" 2>/dev/null
}

write_kubeconfig() {  # write_kubeconfig PATH USER
  local path=$1 user=$2
  cat >"$path.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: finetune-cluster
  cluster:
    server: https://$NODE_IP:$API_PORT
    certificate-authority-data: $(base64 -w0 "$PKI/ca.crt")
users:
- name: $user
  user:
    token: $(token_of "$user")
contexts:
- name: finetune-cluster
  context:
    cluster: finetune-cluster
    user: $user
    namespace: default
current-context: finetune-cluster
EOF
  chmod 600 "$path.tmp"
  mv "$path.tmp" "$path"
}

# ---- host network ---------------------------------------------------------------------------------

# Kept in the cache, not the state dir: `down` must restore the host even when the state dir was
# lost (a /tmp cleaner, a crash). Written only when absent, so the values a crashed cluster left
# behind never become the "original" ones; `down` restores them and deletes the records.
save_host_state() {
  local k p
  mkdir -p "$HOST_RECORD"
  if [[ ! -f "$HOST_RECORD/sysctl.orig" ]]; then
    for k in "${SYSCTLS[@]}"; do
      if [[ -r "/proc/sys/$k" ]]; then echo "$k $(cat "/proc/sys/$k")"; fi
    done >"$HOST_RECORD/sysctl.orig.tmp"
    mv "$HOST_RECORD/sysctl.orig.tmp" "$HOST_RECORD/sysctl.orig"
  fi
  touch "$HOST_RECORD/created-paths"
  for p in "${HOST_PATHS[@]}"; do
    [[ -e "$p" ]] || grep -qxF "$p" "$HOST_RECORD/created-paths" || echo "$p" >>"$HOST_RECORD/created-paths"
  done
}

setup_network() {
  ip link add "$BRIDGE" type bridge
  ip addr add "$NODE_IP/${POD_CIDR#*/}" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  # Service IPs DNAT'ed to pods are forwarded (routed) from the bridge back onto it, and
  # pod-to-Service-to-pod on the same bridge needs bridged traffic to see iptables.
  sysctl -q -w net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1
  # Pods talk to each other, to this machine's addresses and nothing else: no packet from the
  # pod network is forwarded off the bridge.
  iptables -w -N "$FWD_CHAIN"
  iptables -w -A "$FWD_CHAIN" -i "$BRIDGE" -o "$BRIDGE" -j RETURN
  iptables -w -A "$FWD_CHAIN" -i "$BRIDGE" -j DROP
  iptables -w -I FORWARD 1 -m comment --comment "finetune local cluster: pod traffic stays on this machine" -j "$FWD_CHAIN"
}

write_configs() {
  mkdir -p "$CONF" "$STATE/cni/net.d" "$STATE/cni/ipam" "$CONTAINERD_ROOT"
  # CNI: a bridge on ftj0, addresses from host-local (its state in our state dir), no masquerade
  # (nothing leaves the machine).
  cat >"$STATE/cni/net.d/10-finetune.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "finetune",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$BRIDGE",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$STATE/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR", "rangeStart": "$POD_RANGE_START", "rangeEnd": "$POD_RANGE_END", "gateway": "$NODE_IP"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    }
  ]
}
EOF

  cat >"$CONF/containerd.toml" <<EOF
version = 2
# Image store kept across down/up (the image cache); everything else under the state dir.
root = "$CONTAINERD_ROOT"
state = "$STATE/containerd/state"
oom_score = 0
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.devmapper"]

[grpc]
  address = "$SOCK"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    # No CAP_SYS_RESOURCE here: negative oom_score_adj values would be refused.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
          Root = "$STATE/runc"
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$STATE/cni/net.d"
  [plugins."io.containerd.internal.v1.opt"]
    path = "$STATE/containerd/opt"
EOF

  printf '# finetune local cluster: no DNS (use Service environment variables / IPs)\nnameserver 127.0.0.1\noptions attempts:1 timeout:1\n' >"$CONF/resolv.conf"
  cat >"$CONF/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $NODE_IP
port: $KUBELET_PORT
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $KUBELET_HEALTHZ_PORT
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $PKI/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
failSwapOn: false
clusterDomain: cluster.local
# There is no cluster DNS here: pods get the pod's own loopback as nameserver, so a lookup
# fails at once instead of timing out against a resolver they cannot reach.
clusterDNS: [127.0.0.1]
resolvConf: $CONF/resolv.conf
# Nothing can be pulled again: never garbage-collect images, evict only when the disk is full.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
volumeStatsAggPeriod: 0s
maxPods: 110
EOF

  cat >"$CONF/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $NODE_NAME
bindAddress: $NODE_IP
healthzBindAddress: 127.0.0.1:$PROXY_HEALTHZ_PORT
metricsBindAddress: 127.0.0.1:$PROXY_METRICS_PORT
nodePortAddresses: [$NODE_IP/32]
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
}

# ---- commands ----------------------------------------------------------------------------------

lock() {  # one up/down at a time machine-wide (the bridge and ports are machine-wide too)
  mkdir -p "$CACHE"
  exec 8>"$CACHE/cluster.lock"
  flock 8
}

cmd_up() {
  SECONDS=0
  if foreign_cluster; then foreign_env; return 0; fi
  lock
  if is_ready; then
    log "already running and ready (state: $STATE)"
    cmd_env
    return 0
  fi
  if [[ -d "$STATE" || -d "$HOST_RECORD" ]] || [[ -n "$(marked_pids)" ]] || ip link show "$BRIDGE" >/dev/null 2>&1; then
    log "found a stale/partial cluster; removing it first"
    teardown
  fi
  ensure_packages
  ensure_binaries
  [[ -x "$PYTHON" ]] && "$PYTHON" -c "import moto.server" 2>/dev/null ||
    die "$PYTHON cannot import moto.server (make venv, or set FINETUNE_PYTHON)"
  local p
  for p in "$ETCD_CLIENT_PORT" "$ETCD_PEER_PORT" "$API_PORT" "$KCM_PORT" "$SCHED_PORT" "$KUBELET_PORT" \
    "$KUBELET_HEALTHZ_PORT" "$PROXY_METRICS_PORT" "$PROXY_HEALTHZ_PORT" "$S3_PORT"; do
    if port_in_use "$p"; then ss -Htlnp "sport = :$p" >&2; die "TCP port $p is already in use"; fi
  done

  mkdir -p "$STATE" "$PIDS" "$LOGS"
  chmod 700 "$STATE"
  save_host_state
  make_pki
  write_kubeconfig "$KUBECONFIG_PATH" admin
  local u
  for u in kube-controller-manager kube-scheduler kube-proxy; do
    write_kubeconfig "$STATE/$u.kubeconfig" "system:$u"
  done
  write_kubeconfig "$STATE/kubelet.kubeconfig" "system:node:$NODE_NAME"
  setup_network
  write_configs
  log "certificates, configs and bridge $BRIDGE ($NODE_IP) ready (+${SECONDS}s)"

  # Independent daemons first, in parallel.
  start containerd /usr/bin/containerd --config "$CONF/containerd.toml"
  start etcd "$(command -v etcd)" \
    --name finetune-cluster \
    --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "finetune-cluster=http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster-state new
  start s3 "$PYTHON" -m moto.server -H "$NODE_IP" -p "$S3_PORT"
  wait_for "etcd /health" etcd "curl -fsS --max-time 2 http://127.0.0.1:$ETCD_CLIENT_PORT/health | grep -q true"

  start kube-apiserver "$BIN_DIR/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$ETCD_CLIENT_PORT" \
    --bind-address "$NODE_IP" \
    --advertise-address "$NODE_IP" \
    --secure-port "$API_PORT" \
    --insecure-port 0 \
    --cert-dir "$STATE/apiserver-certs" \
    --tls-cert-file "$PKI/apiserver.crt" \
    --tls-private-key-file "$PKI/apiserver.key" \
    --client-ca-file "$PKI/ca.crt" \
    --token-auth-file "$PKI/tokens.csv" \
    --authorization-mode Node,RBAC \
    --enable-admission-plugins NodeRestriction \
    --service-cluster-ip-range "$SERVICE_CIDR" \
    --service-account-issuer "https://kubernetes.default.svc.cluster.local" \
    --service-account-key-file "$PKI/sa.pub" \
    --service-account-signing-key-file "$PKI/sa.key" \
    --kubelet-client-certificate "$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key "$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types InternalIP \
    --allow-privileged=true \
    --profiling=false \
    --v 1

  # While the apiserver starts: containerd, and the sandbox image in it (the kubelet needs it
  # for every pod); also anything else cached but missing (containerd's store is kept across
  # down/up, so normally nothing).
  wait_for "containerd" containerd "ctr --address '$SOCK' version"
  purge_containers
  FINETUNE_CLUSTER_STATE="$STATE" FINETUNE_CONTAINERD_ADDRESS="$SOCK" FINETUNE_PAUSE_IMAGE="$PAUSE_IMAGE" \
    bash "$SCRIPT_DIR/images/build.sh" pause >&2
  # The kubelet and kube-proxy take a few seconds to initialise and retry until the apiserver
  # answers: start them now.
  start kubelet "$BIN_DIR/kubelet" \
    --config "$CONF/kubelet.yaml" \
    --kubeconfig "$STATE/kubelet.kubeconfig" \
    --root-dir "$STATE/kubelet" \
    --cert-dir "$STATE/kubelet/pki" \
    --volume-plugin-dir "$STATE/kubelet/volume-plugins" \
    --container-runtime remote \
    --container-runtime-endpoint "unix://$SOCK" \
    --pod-infra-container-image "$PAUSE_IMAGE" \
    --node-ip "$NODE_IP" \
    --hostname-override "$NODE_NAME" \
    --oom-score-adj 0 \
    --v 1
  start kube-proxy "$BIN_DIR/kube-proxy" --config "$CONF/kube-proxy.yaml" --v 1
  wait_for "kube-apiserver /readyz" kube-apiserver '[[ "$(api_get /readyz)" == ok ]]'

  start kube-controller-manager "$BIN_DIR/kube-controller-manager" \
    --kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$STATE/kube-controller-manager.kubeconfig" \
    --service-account-private-key-file "$PKI/sa.key" \
    --root-ca-file "$PKI/ca.crt" \
    --use-service-account-credentials=true \
    --controllers '*,-nodeipam' \
    --node-monitor-period 2s \
    --leader-elect=false \
    --bind-address 127.0.0.1 \
    --secure-port "$KCM_PORT" \
    --port 0 \
    --cert-dir "$STATE/kcm-certs" \
    --profiling=false \
    --v 1
  start kube-scheduler "$BIN_DIR/kube-scheduler" \
    --kubeconfig "$STATE/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$STATE/kube-scheduler.kubeconfig" \
    --leader-elect=false \
    --bind-address 127.0.0.1 \
    --secure-port "$SCHED_PORT" \
    --port 0 \
    --cert-dir "$STATE/scheduler-certs" \
    --profiling=false \
    --v 1

  FINETUNE_CLUSTER_STATE="$STATE" FINETUNE_CONTAINERD_ADDRESS="$SOCK" FINETUNE_PAUSE_IMAGE="$PAUSE_IMAGE" \
    bash "$SCRIPT_DIR/images/build.sh" import >&2

  wait_for "S3 server $S3_ENDPOINT" s3 s3_ready
  wait_for "node $NODE_NAME Ready (untainted)" kubelet node_ready
  wait_for "serviceaccount default/default with a token secret" kube-controller-manager sa_token_ready
  wait_for "kube-proxy rules for the kubernetes Service ($SERVICE_IP)" kube-proxy services_programmed
  log "up in ${SECONDS}s; state dir $STATE"
  cmd_env
}

# Kill and delete every container in containerd's k8s.io namespace (the kubelet must be stopped,
# or be about to start): nothing of an earlier cluster survives into the next.
purge_containers() {
  [[ -S "$SOCK" ]] && ctr --address "$SOCK" version >/dev/null 2>&1 || return 0
  local ids id
  ids=$(ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null || true)
  for id in $ids; do ctr --address "$SOCK" -n k8s.io tasks kill -a -s SIGKILL "$id" >/dev/null 2>&1 || true; done
  for id in $ids; do ctr --address "$SOCK" -n k8s.io tasks delete -f "$id" >/dev/null 2>&1 || true; done
  ids=$(ctr --address "$SOCK" -n k8s.io containers ls -q 2>/dev/null || true)
  for id in $ids; do ctr --address "$SOCK" -n k8s.io containers delete "$id" >/dev/null 2>&1 || true; done
  [[ -z "$ids" ]] || log "removed $(wc -w <<<"$ids") containers"
}

alive() {  # a zombie (exited, not yet reaped by init) counts as gone
  local s
  s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  s=${s##*) }
  [[ "${s:0:1}" != Z ]]
}

kill_pids() {  # TERM, then KILL after 10s
  local pid i
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  for pid in "$@"; do
    for ((i = 0; i < 100; i++)); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      log "pid $pid ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
}

stop_components() {  # stop_components NAME...: all at once
  local c pid pids=()
  for c in "$@"; do
    pid=$(live_pid "$c") || continue
    log "stopping $c (pid $pid)"
    pids+=("$pid")
  done
  kill_pids "${pids[@]}"
}

cgroup_kubepods_dirs() {
  local d
  for d in /sys/fs/cgroup/*/kubepods /sys/fs/cgroup/kubepods; do [[ -d "$d" ]] && echo "$d"; done
  return 0
}

# Remove everything `up` made. Safe to run at any point (partial up, crashed components, a
# deleted state dir).
teardown() {
  local i pid d m p
  # 1. The kubelet first (it would restart containers), then the containers themselves.
  stop_components kubelet kube-proxy kube-scheduler kube-controller-manager
  purge_containers
  stop_components kube-apiserver s3   # before etcd: it drains requests against etcd
  stop_components etcd containerd
  # 2. Anything of ours still alive: shims, orphans whose pid files are gone, container processes.
  mapfile -t pids < <(marked_pids)
  ((${#pids[@]} == 0)) || { log "stopping ${#pids[@]} leftover processes: ${pids[*]}"; kill_pids "${pids[@]}"; }
  for d in $(cgroup_kubepods_dirs); do
    for pid in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u); do
      log "killing container process $pid"
      kill -KILL "$pid" 2>/dev/null || true
    done
  done
  # 3. Mounts under the state dir (pod volumes, container rootfs, network namespaces), deepest first.
  for m in $(awk -v p="$STATE/" 'index($2, p) == 1 {print $2}' /proc/self/mounts | awk '{print length, $0}' | sort -rn | cut -d' ' -f2-); do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || log "could not unmount $m"
  done
  # 4. Network: veths still on the bridge, the bridge, our iptables chains (and kube-proxy's/the
  #    kubelet's KUBE-* chains: nothing else on this machine makes them).
  if ip link show "$BRIDGE" >/dev/null 2>&1; then
    for p in $(ip -o link show master "$BRIDGE" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
      ip link delete "$p" 2>/dev/null || true
    done
    ip link delete "$BRIDGE" 2>/dev/null || true
  fi
  [[ -x "$BIN_DIR/kube-proxy" ]] && "$BIN_DIR/kube-proxy" --cleanup --v 0 >/dev/null 2>&1 || true
  clean_iptables iptables
  clean_iptables ip6tables
  # 5. cgroups the kubelet created (empty now), deepest first.
  for d in $(cgroup_kubepods_dirs); do
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    [[ -d "$d" ]] && log "could not remove cgroup $d"
  done
  # 6. Kernel settings back as they were; host paths the components created.
  if [[ -f "$HOST_RECORD/sysctl.orig" ]]; then
    while read -r k v; do
      [[ "$(cat "/proc/sys/$k" 2>/dev/null)" == "$v" ]] || sysctl -q -w "${k//\//.}=$v" 2>/dev/null || log "could not restore $k=$v"
    done <"$HOST_RECORD/sysctl.orig"
  fi
  rm -f /var/lib/cni/results/finetune-* 2>/dev/null || true
  if [[ -f "$HOST_RECORD/created-paths" ]]; then
    while read -r p; do
      [[ "$p" == /run/containerd && -S /run/containerd/containerd.sock ]] && continue  # a system containerd came up meanwhile
      rm -rf "$p"
    done <"$HOST_RECORD/created-paths"
  fi
  rm -rf "$STATE" "$HOST_RECORD"
}

clean_iptables() {  # clean_iptables iptables|ip6tables
  local tool=$1 table rules chains
  command -v "$tool-save" >/dev/null || return 0
  for table in filter nat mangle raw; do
    rules=$("$tool-save" -t "$table" 2>/dev/null) || continue
    chains=$(grep -oE '^:(KUBE-|CNI-|FINETUNE-)[^ ]+' <<<"$rules" | cut -c2- || true)
    [[ -n "$chains" ]] || continue
    {
      echo "*$table"
      # jumps into our chains from chains that are not ours
      grep -E '^-A ' <<<"$rules" | grep -vE '^-A (KUBE-|CNI-|FINETUNE-)' | grep -E -- '-j (KUBE-|CNI-|FINETUNE-)' | sed 's/^-A /-D /' || true
      for c in $chains; do echo "-F $c"; done
      for c in $chains; do echo "-X $c"; done
      echo COMMIT
    } | "$tool-restore" -w --noflush 2>/dev/null || log "$tool: could not remove all chains in table $table"
  done
}

cmd_down() {
  lock
  SECONDS=0
  teardown
  log "down in ${SECONDS}s (removed $STATE; images stay in $CONTAINERD_ROOT and $CACHE/images)"
}

cmd_env() {
  if [[ "${1:-}" == check ]] && foreign_cluster 2>/dev/null; then foreign_env; return 0; fi
  echo "export KUBECONFIG=$KUBECONFIG_PATH"
  echo "export FINETUNE_S3_ENDPOINT=$S3_ENDPOINT"
  [[ -f "$KUBECONFIG_PATH" ]] || log "(the local cluster is not running: scripts/cluster.sh up)"
  log "S3 endpoint for pods and this machine: $S3_ENDPOINT (moto; any access key/secret)"
}

cmd_status() {
  local c pid rc=0
  for c in "${COMPONENTS[@]}"; do
    if pid=$(live_pid "$c"); then echo "  $c: running (pid $pid)"; else echo "  $c: not running"; rc=1; fi
  done
  if is_ready 2>/dev/null; then
    echo "ready: https://$NODE_IP:$API_PORT (KUBECONFIG=$KUBECONFIG_PATH), S3 $S3_ENDPOINT"
  else
    echo "not ready (state dir: $STATE)"
    rc=1
  fi
  if [[ -n "${KUBECONFIG:-}" && "$KUBECONFIG" != "$KUBECONFIG_PATH" ]]; then
    echo "note: KUBECONFIG=$KUBECONFIG (not the local cluster) is set in this shell"
  fi
  return $rc
}

if [[ "${1:-}" == up || "${1:-}" == down ]] && [[ $(id -u) -ne 0 ]]; then
  die "must run as root (network, mounts, cgroups, containerd)"
fi
case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  env) cmd_env check ;;
  status) cmd_status ;;
  *) echo "usage: $0 {up|down|env|status}" >&2; exit 2 ;;
esac
