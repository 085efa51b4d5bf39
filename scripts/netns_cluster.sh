#!/usr/bin/env bash
# A multi-host test bed on one machine: K network namespaces on a private bridge.
#
#   scripts/netns_cluster.sh up K          namespaces PREFIX0..PREFIX{K-1}, each with eth0 =
#                                          SUBNET.(i+1)/24 and lo up, veths PREFIXv<i> on bridge PREFIXbr
#   scripts/netns_cluster.sh down          remove them (idempotent)
#   scripts/netns_cluster.sh hosts         "PREFIX<i> addr=SUBNET.(i+1)" lines, for servers/workers files
#   scripts/netns_cluster.sh cut I         take host I off the network (its veth down) ...
#   scripts/netns_cluster.sh heal I        ... and back
#   scripts/netns_cluster.sh impair I delay 50ms | loss 1 | rate 10mbit
#                                          tc netem on host I's eth0 (egress); where the kernel
#                                          has no netem, "loss P" falls back to an nftables
#                                          rule (numgen random) and "rate" uses tbf
#   scripts/netns_cluster.sh clear I       remove the impairments of host I
#   scripts/netns_cluster.sh status        what exists
#
# I is an index or a namespace name.  Settings (environment or -p/-s before the command):
#   BYZSGD_NETNS_PREFIX (-p, default "byz"), BYZSGD_NETNS_SUBNET (-s, default "10.77.0": a /24).
# Needs root and iproute2 (`apt-get install -y iproute2`; nftables for the loss fallback).
# Nothing leaves the bridge: it has no address and no route, so traffic stays in the
# namespaces.  Run jobs on a host with: ip netns exec PREFIX<i> CMD (BYZSGD_RUNNER="ip netns exec").
set -euo pipefail

prefix=${BYZSGD_NETNS_PREFIX:-byz}
subnet=${BYZSGD_NETNS_SUBNET:-10.77.0}
while getopts "p:s:h" opt; do
    case $opt in
        p) prefix=$OPTARG ;;
        s) subnet=$OPTARG ;;
        *) sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
cmd=${1:-}
[[ -n $cmd ]] || { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
shift

die() { echo "netns_cluster: $*" >&2; exit 1; }
[[ $prefix =~ ^[a-zA-Z][a-zA-Z0-9_]{0,8}$ ]] || die "prefix must be 1-9 letters/digits, got '$prefix'"
[[ $subnet =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "subnet must be the first three octets, got '$subnet'"
command -v ip >/dev/null || die "no 'ip' (apt-get install -y iproute2)"
[[ $(id -u) -eq 0 ]] || die "needs root"

bridge=${prefix}br
ns_name() { if [[ $1 =~ ^[0-9]+$ ]]; then echo "$prefix$1"; else echo "$1"; fi; }
ns_index() { local n; n=$(ns_name "$1"); [[ $n =~ ^$prefix([0-9]+)$ ]] || die "not one of ours: $n"; echo "${BASH_REMATCH[1]}"; }
ours() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^${prefix}[0-9]+$" | sort -V || true; }
have_ns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

up() {
    local k=${1:-}
    [[ $k =~ ^[0-9]+$ && $k -ge 1 && $k -le 250 ]] || die "up K: K in 1..250"
    if ! ip link show "$bridge" >/dev/null 2>&1; then
        ip link add "$bridge" type bridge
    fi
    ip link set "$bridge" up
    local i ns veth
    for ((i = 0; i < k; i++)); do
        ns=$prefix$i veth=${prefix}v$i
        have_ns "$ns" || ip netns add "$ns"
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip -n "$ns" link del eth0 2>/dev/null || true
            ip link add "$veth" type veth peer name eth0 netns "$ns"
        fi
        ip link set "$veth" master "$bridge"
        ip link set "$veth" up
        ip -n "$ns" link set lo up
        ip -n "$ns" addr replace "$subnet.$((i + 1))/24" dev eth0
        ip -n "$ns" link set eth0 up
    done
}

down() {
    local ns
    for ns in $(ours); do
        ip netns del "$ns" 2>/dev/null || true   # its eth0 goes, and the veth peer with it
    done
    local v
    for v in $(ip -o link show 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1 | grep -E "^${prefix}v[0-9]+$" || true); do
        ip link del "$v" 2>/dev/null || true
    done
    ip link del "$bridge" 2>/dev/null || true
}

hosts() {
    local ns
    for ns in $(ours); do echo "$ns addr=$subnet.$(( $(ns_index "$ns") + 1 ))"; done
}

has_netem() {
    # probe on a throw-away veth pair: does this kernel know netem?
    local ns=$1
    ip netns exec "$ns" tc qdisc add dev lo root netem delay 0ms 2>/dev/null || return 1
    ip netns exec "$ns" tc qdisc del dev lo root 2>/dev/null || true
}

impair() {
    local ns kind value
    ns=$(ns_name "${1:-}"); kind=${2:-}; value=${3:-}
    have_ns "$ns" || die "no namespace $ns"
    case $kind in
        delay|loss|rate) ;;
        *) die "impair HOST delay 50ms | loss 1 | rate 10mbit" ;;
    esac
    [[ -n $value ]] || die "impair $ns $kind: value missing"
    value=${value%\%}
    if has_netem "$ns"; then
        local arg
        case $kind in
            delay) arg="delay $value" ;;
            loss) arg="loss $value%" ;;
            rate) arg="rate $value" ;;
        esac
        ip netns exec "$ns" tc qdisc replace dev eth0 root netem $arg
        echo "netem $arg"
        return
    fi
    case $kind in
        loss)
            command -v nft >/dev/null || die "no netem in this kernel and no nft (apt-get install -y nftables)"
            [[ $value =~ ^[0-9]+$ ]] || die "the nftables fallback takes an integer loss percentage"
            ip netns exec "$ns" nft delete table inet byzsgd_impair 2>/dev/null || true
            ip netns exec "$ns" nft -f - <<NFT
table inet byzsgd_impair {
    chain out { type filter hook output priority 0; policy accept; numgen random mod 100 < $value counter drop; }
    chain in { type filter hook input priority 0; policy accept; numgen random mod 100 < $value counter drop; }
}
NFT
            echo "nftables loss $value% (both directions; no netem in this kernel)" ;;
        rate)
            ip netns exec "$ns" tc qdisc replace dev eth0 root tbf rate "$value" burst 32kbit latency 400ms
            echo "tbf rate $value" ;;
        delay)
            die "this kernel has no netem (CONFIG_NET_SCH_NETEM): no delay emulation; try loss or rate" ;;
    esac
}

clear_impair() {
    local ns
    ns=$(ns_name "${1:-}")
    have_ns "$ns" || die "no namespace $ns"
    ip netns exec "$ns" tc qdisc del dev eth0 root 2>/dev/null || true
    if command -v nft >/dev/null; then
        ip netns exec "$ns" nft delete table inet byzsgd_impair 2>/dev/null || true
    fi
}

case $cmd in
    up) up "$@" ;;
    down) down ;;
    hosts) hosts ;;
    cut) ns=$(ns_name "${1:-}"); ip link set "${prefix}v$(ns_index "$ns")" down ;;
    heal) ns=$(ns_name "${1:-}"); ip link set "${prefix}v$(ns_index "$ns")" up ;;
    impair) impair "$@" ;;
    clear) clear_impair "$@" ;;
    status)
        echo "bridge: $(ip -br link show "$bridge" 2>/dev/null || echo none)"
        for ns in $(ours); do
            echo "$ns: $(ip -n "$ns" -br addr show eth0 2>/dev/null | tr -s ' ')" \
                 "veth $(ip -br link show "${prefix}v$(ns_index "$ns")" 2>/dev/null | awk '{print $2}')" \
                 "qdisc $(ip netns exec "$ns" tc qdisc show dev eth0 2>/dev/null | head -1 | awk '{print $2}')"
        done ;;
    *) die "unknown command '$cmd' (up K | down | hosts | cut I | heal I | impair I ... | clear I | status)" ;;
esac
