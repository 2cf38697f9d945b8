#!/usr/bin/env bash
# Why: kind needs a Docker engine, and CI machines have none (only a docker client). `up` uses an engine that
# already answers; otherwise it starts a PRIVATE dockerd from Debian's packages with its own socket, state and
# addresses (198.19.0.0/16, see lib.sh), a closed proxy so that no image is ever pulled, and a runc wrapper that
# lets privileged containers start on hosts without CAP_SYS_RESOURCE. `down` stops that engine and undoes every
# change it made to the host (bridges, iptables chains and rules, FORWARD policy, sysctls).
#
#   eval "$(bash hack/kind/docker.sh up)"   prints `export DOCKER_HOST=...` and `export BEACON_DOCKER_PRIVATE=1`
#                                           (nothing when an engine already answered)
#   bash hack/kind/docker.sh down [-f]      stops the engine `up` started, once no holder is left (-f: now)
#   bash hack/kind/docker.sh status
#
# Holders: every `up` registers a holder, $BEACON_DOCKER_LEASE (with-docker.sh sets its own pid) or "manual";
# `down` removes the same holder and stops the engine only when no live holder remains, so concurrent
# with-docker.sh runs share one engine. The image store persists under $BEACON_CACHE/docker (warm next run).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=/dev/null
. "$here/lib.sh"

RUN_DIR=${BEACON_DOCKER_RUN_DIR:-/run/beacon-docker}
LOCK_FILE=$RUN_DIR.lock
SOCK=$RUN_DIR/docker.sock
EXEC_ROOT=$RUN_DIR/exec
PIDFILE=$RUN_DIR/dockerd.pid
BEFORE=$RUN_DIR/before.env
LEASES=$RUN_DIR/leases
DATA_ROOT=$BEACON_CACHE/docker
LOG=$BEACON_CACHE/dockerd.log
# a local port nothing listens on: a pull fails at once instead of reaching for a registry
CLOSED_PROXY=http://127.0.0.1:9
LEASE=${BEACON_DOCKER_LEASE:-manual}
SYSCTLS=(net.ipv4.ip_forward net.bridge.bridge-nf-call-iptables net.bridge.bridge-nf-call-ip6tables
  net.bridge.bridge-nf-call-arptables)
export PATH=$PATH:/usr/local/sbin:/usr/sbin:/sbin

say() { kind_say docker "$@"; }

lock() {
  exec 9>"$LOCK_FILE"
  flock -w 600 9 || kind_die docker "timed out waiting for $LOCK_FILE"
}

# the pid of our dockerd when it runs, else nothing
our_pid() {
  local pid
  [[ -s $PIDFILE ]] || return 0
  pid=$(<"$PIDFILE")
  [[ $(cmdline_of "$pid") == *dockerd* ]] && echo "$pid"
  return 0
}

cmdline_of() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

answers() { timeout 20 docker "$@" info >/dev/null 2>&1; }

print_env() {
  printf 'export DOCKER_HOST=%q\n' "unix://$SOCK"
  printf 'export BEACON_DOCKER_PRIVATE=1\n'
}

# holders whose pid is gone (a with-docker.sh that was killed) no longer count
prune_leases() {
  local f name
  [[ -d $LEASES ]] || return 0
  for f in "$LEASES"/*; do
    [[ -e $f ]] || continue
    name=${f##*/}
    if [[ $name =~ ^[0-9]+$ ]] && ! kill -0 "$name" 2>/dev/null; then
      rm -f "$f"
    fi
  done
}

live_leases() {
  prune_leases
  [[ -d $LEASES ]] || return 0
  find "$LEASES" -mindepth 1 -maxdepth 1 -printf '%f\n' | sort | tr '\n' ' '
}

ensure_packages() {
  local missing=() tmp_policy=
  command -v dockerd >/dev/null || missing+=(docker.io)
  command -v containerd >/dev/null || missing+=(containerd)
  command -v runc >/dev/null || missing+=(runc)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v nft >/dev/null || missing+=(nftables)
  command -v flock >/dev/null || missing+=(util-linux)
  command -v ip >/dev/null || missing+=(iproute2)
  command -v python3 >/dev/null || missing+=(python3)
  ((${#missing[@]})) || return 0
  say "installing ${missing[*]} with apt-get"
  # Debian's docker.io starts the system's dockerd (docker0 in 172.17/16) on install unless policy-rc.d says no
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    tmp_policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\n# temporary, hack/kind/docker.sh: start no service while installing\nexit 101\n' >"$tmp_policy"
    chmod 755 "$tmp_policy"
  fi
  local apt=(apt-get -o DPkg::Lock::Timeout=600 -qq)
  {
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${missing[@]}" ||
      { "${apt[@]}" update && DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends \
        "${missing[@]}"; }
  } >&2 || { [[ -z $tmp_policy ]] || rm -f "$tmp_policy"; kind_die docker "apt-get install ${missing[*]} failed"; }
  [[ -z $tmp_policy ]] || rm -f "$tmp_policy"
}

# what dockerd will change, recorded before it starts so that `down` can put it back
record_before() {
  local s path
  {
    for s in "${SYSCTLS[@]}"; do
      path=/proc/sys/${s//.//}
      [[ -r $path ]] && printf 'sysctl %s %s\n' "$s" "$(<"$path")"
    done
    printf 'forward_policy %s\n' "$(iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}')"
    ip -o link show | awk -F': ' '{sub(/@.*/, "", $2); print "link", $2}'
    nft list tables 2>/dev/null | awk '{print "nft_table", $2, $3}'
  } >"$BEFORE"
}

start_engine() {
  local python real_runc pid i
  ensure_packages
  mkdir -p "$RUN_DIR" "$EXEC_ROOT" "$LEASES" "$DATA_ROOT"
  chmod 700 "$RUN_DIR"
  record_before
  # the wrapper runs under a system python3 when there is one (no version-manager shims on dockerd's PATH)
  python=/usr/bin/python3
  [[ -x $python ]] || python=$(python3 -c 'import sys; print(sys.executable)')
  real_runc=$(command -v runc)
  { printf '#!%s -I\n' "$python"; tail -n +2 "$here/runc-wrapper"; } >"$RUN_DIR/runc-wrapper"
  chmod 755 "$RUN_DIR/runc-wrapper"
  ln -sfn "$real_runc" "$RUN_DIR/runc.real"
  python3 - "$RUN_DIR/daemon.json" <<EOF
import json, sys
config = {
    "hosts": ["unix://$SOCK"],
    "data-root": "$DATA_ROOT",
    "exec-root": "$EXEC_ROOT",
    "pidfile": "$PIDFILE",
    "storage-driver": "overlay2",
    "bip": "$DOCKER_BIP",
    "default-address-pools": [{"base": "$DOCKER_POOL_BASE", "size": 24}],
    "runtimes": {"beacon-runc": {"path": "$RUN_DIR/runc-wrapper"}},
    "default-runtime": "beacon-runc",
    "oom-score-adjust": 0,
    "features": {"buildkit": False},
    "log-driver": "json-file",
    "log-opts": {"max-size": "10m", "max-file": "2"},
}
with open(sys.argv[1], "w") as f:
    json.dump(config, f, indent=2)
EOF
  say "starting a private dockerd (socket $SOCK, data-root $DATA_ROOT, log $LOG)"
  # its own session: it outlives the calling shell and its process group; `down` stops it by pid
  env -u NO_PROXY -u no_proxy HTTP_PROXY=$CLOSED_PROXY HTTPS_PROXY=$CLOSED_PROXY http_proxy=$CLOSED_PROXY \
    https_proxy=$CLOSED_PROXY PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    setsid dockerd --config-file "$RUN_DIR/daemon.json" </dev/null >"$LOG" 2>&1 9>&- &
  pid=$!
  for ((i = 0; i < 120; i++)); do
    if answers -H "unix://$SOCK"; then
      [[ -s $PIDFILE ]] || echo "$pid" >"$PIDFILE"
      guard_forwarding
      say "private dockerd $(docker -H "unix://$SOCK" version -f '{{.Server.Version}}') is up (pid $pid)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      break
    fi
    sleep 0.5
  done
  say "dockerd did not come up; last lines of $LOG:"
  tail -n 20 "$LOG" >&2 || true
  echo "$pid" >"$PIDFILE"
  stop_engine
  exit 1
}

# Containers of this engine may talk to each other, to the host and to 198.18.0.0/15 (test hosts), never beyond.
guard_forwarding() {
  local src=198.18.0.0/15
  iptables -N DOCKER-USER 2>/dev/null || true
  iptables -C DOCKER-USER -s "$src" ! -d "$src" -j DROP 2>/dev/null ||
    iptables -I DOCKER-USER -s "$src" ! -d "$src" -j DROP
}

# the bridges dockerd made: docker0 and br-<network id>, unless they were there before `up`
our_bridges() {
  local name
  while read -r name; do
    [[ $name == docker0 || $name =~ ^br-[0-9a-f]{12}$ ]] || continue
    grep -qxF "link $name" "$BEFORE" 2>/dev/null && continue
    echo "$name"
  done < <(ip -o link show type bridge | awk -F': ' '{print $2}')
}

# pids whose command line names our exec-root: the managed containerd and the shims (before the engine is gone)
stragglers() {
  local f pid
  for f in /proc/[0-9]*/cmdline; do
    pid=${f#/proc/}
    pid=${pid%/cmdline}
    [[ $pid == "$$" || $pid == "$BASHPID" ]] && continue
    [[ $(cmdline_of "$pid") == *"$EXEC_ROOT/"* ]] && echo "$pid"
  done
  return 0
}

kill_and_wait() {
  local seconds=$1 pid i alive
  shift
  (($#)) || return 0
  kill -TERM "$@" 2>/dev/null || true
  for ((i = 0; i < seconds * 4; i++)); do
    alive=0
    for pid in "$@"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.25
  done
  say "still running after ${seconds}s, killing: $*"
  kill -KILL "$@" 2>/dev/null || true
  sleep 0.5
}

undo_iptables() {
  local bridges=("$@") table line re
  re='-j DOCKER|-g DOCKER'
  for b in "${bridges[@]}"; do re+="|-[io] $b( |$)"; done
  for table in filter nat; do
    # every rule outside DOCKER* chains that jumps into one or names one of our bridges
    iptables-save -t "$table" 2>/dev/null | awk -v re="$re" '/^-A / && !/^-A DOCKER/ && $0 ~ re' |
      while IFS= read -r line; do
        printf '*%s\n%s\nCOMMIT\n' "$table" "-D ${line#-A }" | iptables-restore --noflush ||
          say "could not delete ($table) $line"
      done
    # then the DOCKER* chains themselves
    iptables-save -t "$table" 2>/dev/null | awk '/^:DOCKER/ {print substr($1, 2)}' | while read -r chain; do
      iptables -t "$table" -F "$chain" || true
    done
    iptables-save -t "$table" 2>/dev/null | awk '/^:DOCKER/ {print substr($1, 2)}' | while read -r chain; do
      iptables -t "$table" -X "$chain" || say "could not delete chain ($table) $chain"
    done
  done
}

restore_host() {
  local key name value bridges=() b
  mapfile -t bridges < <(our_bridges)
  for b in "${bridges[@]}"; do
    ip link delete "$b" 2>/dev/null || say "could not delete bridge $b"
  done
  undo_iptables "${bridges[@]}"
  while read -r key name value; do
    case $key in
      forward_policy)
        [[ -n $name ]] && iptables -P FORWARD "$name"
        ;;
      sysctl)
        if [[ -w /proc/sys/${name//.//} && $(<"/proc/sys/${name//.//}") != "$value" ]]; then
          echo "$value" >"/proc/sys/${name//.//}"
        fi
        ;;
    esac
  done <"$BEFORE"
  # nftables tables that iptables-nft created for dockerd and that are empty again
  local family table rules
  while read -r family table; do
    grep -qxF "nft_table $family $table" "$BEFORE" && continue
    [[ $family == ip && ($table == filter || $table == nat) ]] || continue
    rules=$(iptables-save -t "$table" 2>/dev/null || echo unknown)
    if [[ $rules != unknown && ! $rules =~ (^|$'\n')(-A |:[A-Z]+ (DROP|REJECT)) ]]; then
      nft delete table "$family" "$table" 2>/dev/null || true
    fi
  done < <(nft list tables 2>/dev/null | awk '{print $2, $3}')
}

stop_engine() {
  local pid mnt
  pid=$(our_pid)
  if [[ -n $pid ]]; then
    say "stopping the private dockerd (pid $pid)"
    kill_and_wait 120 "$pid"
  fi
  local rest=()
  mapfile -t rest < <(stragglers)
  if ((${#rest[@]})); then
    say "stopping what dockerd left behind: ${rest[*]}"
    # with their children (container processes whose shim is going away)
    local kids=()
    mapfile -t kids < <(for p in "${rest[@]}"; do pgrep -P "$p" || true; done)
    kill_and_wait 20 "${rest[@]}" "${kids[@]}"
  fi
  # mounts dockerd left (after a crash): netns files under exec-root, overlays under data-root
  while read -r mnt; do
    umount -l "$mnt" 2>/dev/null || true
  done < <(awk -v a="$RUN_DIR/" -v b="$DATA_ROOT/" 'index($5, a) == 1 || index($5, b) == 1 {print $5}' \
    /proc/self/mountinfo | sort -r)
  if [[ -f $BEFORE ]]; then
    restore_host
  fi
  rm -rf "$RUN_DIR"
  say "private dockerd stopped; host restored"
}

cmd_up() {
  lock
  local pid i
  pid=$(our_pid)
  if [[ -n $pid ]]; then
    # a busy engine (builds on 2 cores) can be slow to answer; never restart it under someone else's feet
    for ((i = 0; i < 6; i++)); do
      if answers -H "unix://$SOCK"; then
        mkdir -p "$LEASES" && touch "$LEASES/$LEASE"
        print_env
        return 0
      fi
    done
    kind_die docker "our dockerd (pid $pid) runs but does not answer; see $LOG (\`$0 down -f\` stops it)"
  elif [[ -d $RUN_DIR ]]; then
    say "cleaning up after a private dockerd that is gone"
    stop_engine
  fi
  if answers; then
    say "using the Docker engine that answers at ${DOCKER_HOST:-the default socket}"
    return 0
  fi
  start_engine
  touch "$LEASES/$LEASE"
  print_env
}

cmd_down() {
  local force=${1:-} others
  lock
  if [[ ! -d $RUN_DIR ]]; then
    say "no private dockerd of ours; nothing to stop"
    return 0
  fi
  rm -f "$LEASES/$LEASE"
  others=$(live_leases)
  if [[ -n $others && $force != -f ]]; then
    say "private dockerd still used by: $others; leaving it running (down -f stops it now)"
    return 0
  fi
  stop_engine
}

cmd_status() {
  local pid
  pid=$(our_pid)
  if [[ -n $pid ]]; then
    echo "private dockerd: pid $pid, DOCKER_HOST=unix://$SOCK, data-root $DATA_ROOT, holders: $(live_leases)"
  elif answers; then
    echo "no private dockerd; an engine answers at ${DOCKER_HOST:-the default socket}"
  else
    echo "no Docker engine"
    return 1
  fi
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down "${2:-}" ;;
  status) cmd_status ;;
  *)
    echo "usage: $0 up|down [-f]|status" >&2
    exit 2
    ;;
esac
