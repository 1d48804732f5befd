#!/usr/bin/env bash
# slurm/local-cluster.sh -- a real SLURM cluster on this one machine, for mlmega's tests and demos.
#
# Usage:
#   slurm/local-cluster.sh start          install (if needed), configure and start; wait for the nodes
#   slurm/local-cluster.sh stop [--wipe]  cancel jobs, stop the daemons; --wipe also deletes all state
#   slurm/local-cluster.sh env            print `export SLURM_CONF=...` (only that, on stdout):
#                                           eval "$(slurm/local-cluster.sh env)"
#   slurm/local-cluster.sh status         daemons, sinfo and squeue; exit 3 when slurmctld is down
#
# What runs: munged (own key and socket), optionally MariaDB + slurmdbd (so `sacct` works), slurmctld
# and one `slurmd -N nX` per fake node n1..nN. All fake nodes are this host, reached on 127.0.0.1
# with one port each. Everything (configs, state, logs, pid files, database) lives under
# $MLMEGA_SLURM_DIR; nothing is written to /etc. The packages come from Debian (apt-get) when missing.
#
# `start` is idempotent: daemons that are already running (checked by pid file, process state and
# command name; a zombie counts as dead) are left alone, so a second `start` is a quick no-op. When
# the generated slurm.conf differs from the running one (e.g. another node count) slurmctld and the
# slurmd's are restarted; the state (queued and running jobs) is kept.
# Runs as root (it installs packages and runs the daemons as root: SlurmUser=root).
#
# Knobs (environment):
#   MLMEGA_SLURM_DIR         state/config directory                 (default /tmp/mlmega-slurm)
#   MLMEGA_SLURM_NODES       number of fake nodes                   (default 2)
#   MLMEGA_SLURM_CPUS        CPUs advertised per node               (default nproc, at least 2)
#   MLMEGA_SLURM_MEM_MB      RealMemory per node in MB              (default MemTotal / nodes)
#   MLMEGA_SLURM_ACCOUNTING  1: slurmdbd + MariaDB (sacct works)    (default 1)
#   MLMEGA_SLURM_PORT_BASE   slurmctld=BASE, slurmdbd=BASE+1, MariaDB=BASE+2,
#                            node i=BASE+10+i                       (default 16800)
#   MLMEGA_SLURM_TIMEOUT     seconds to wait for daemons and nodes  (default 120)
#
# Facts this relies on (Debian 12: slurm-wlm 22.05, munge 0.5, MariaDB 10.11):
# - munged's socket directory must be searchable by everyone, its files not group/world-writable.
# - cred_expire (AuthInfo) is also how long a requeued job waits before it may start again
#   (default 120 s); we use 10 s. It is read only at daemon start (not by `scontrol reconfigure`).
# - slurmdbd takes the munge socket from AccountingStoragePass, not from AuthInfo.
# - slurmdbd refuses a slurmdbd.conf readable by others.
# - Fake node names do not resolve: jobs must use 127.0.0.1 as their rendez-vous address.
# - Exited daemons may linger as zombies when PID 1 reaps slowly: check the process state.
set -euo pipefail
umask 022
export PATH="$PATH:/usr/sbin:/sbin"   # the daemons live in sbin

ME="local-cluster.sh"
D=${MLMEGA_SLURM_DIR:-/tmp/mlmega-slurm}
NODES=${MLMEGA_SLURM_NODES:-2}
ACCOUNTING=${MLMEGA_SLURM_ACCOUNTING:-1}
PORT_BASE=${MLMEGA_SLURM_PORT_BASE:-16800}
TIMEOUT=${MLMEGA_SLURM_TIMEOUT:-120}
CLUSTER=mlmega

CONF=$D/etc/slurm.conf
DBD_CONF=$D/etc/slurmdbd.conf
MUNGE_SOCKET=$D/munge/munge.socket
DB_SOCKET=$D/db/mysqld.sock
CTLD_PORT=$PORT_BASE
DBD_PORT=$((PORT_BASE + 1))
DB_PORT=$((PORT_BASE + 2))
MARKER=$D/.mlmega-local-slurm    # `stop --wipe` deletes only a directory that carries this marker

say() { echo "[$ME $(date +%T)] $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# ------------------------------------------------------------------ process helpers
# running PIDFILE COMM: the pid in PIDFILE is a live (non-zombie) process whose command is COMM.
running() {
    local pid st comm
    [ -s "$1" ] || return 1
    pid=$(tr -dc '0-9' < "$1")
    [ -n "$pid" ] || return 1
    read -r st comm < <(ps -o stat=,comm= -p "$pid" 2>/dev/null) || return 1
    [ -n "${st:-}" ] && [ "${st:0:1}" != Z ] && [ "$comm" = "$2" ]
}
# gone PID: no such process, or only a zombie waiting to be reaped.
gone() {
    local st
    st=$(ps -o stat= -p "$1" 2>/dev/null) || return 0
    [ -z "$st" ] || [ "${st:0:1}" = Z ]
}
# retry SECONDS CMD...: run CMD (quietly) until it succeeds; fail after SECONDS.
retry() {
    local end=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 0.2
    done
}
# await WHAT PIDFILE COMM CMD...: wait up to $TIMEOUT s until CMD succeeds; fail at once (with the
# logs) when the daemon has exited, e.g. because its port is taken.
await() {
    local what=$1 pidfile=$2 comm=$3 t0=$SECONDS; shift 3
    until "$@" >/dev/null 2>&1; do
        # (a daemon writes its pid file shortly after it starts: allow it 3 s)
        if [ $((SECONDS - t0)) -ge 3 ] && ! running "$pidfile" "$comm"; then fail "$what exited"; fi
        [ $((SECONDS - t0)) -lt "$TIMEOUT" ] || fail "$what does not answer after ${TIMEOUT}s"
        sleep 0.2
    done
}
# stop_daemon PIDFILE COMM: SIGTERM, wait up to 20 s, then SIGKILL.
stop_daemon() {
    local pid
    running "$1" "$2" || return 0
    pid=$(tr -dc '0-9' < "$1")
    say "stopping $(basename "$1" .pid) (pid $pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do gone "$pid" && return 0; sleep 0.2; done
    say "$2 (pid $pid) still alive after 20 s: SIGKILL"
    kill -9 "$pid" 2>/dev/null || true
    for _ in $(seq 25); do gone "$pid" && return 0; sleep 0.2; done
}
# Log tails for error messages.
show_logs() {
    local f
    for f in "$D"/log/*.log "$D"/log/*.stderr "$D/munge/munged.log" "$D/db/mysqld.err"; do
        [ -s "$f" ] || continue
        echo "----- tail $f" >&2
        tail -n 15 "$f" >&2
    done
}
fail() { say "ERROR: $*"; show_logs; exit 1; }

# ------------------------------------------------------------------ install
ensure_packages() {
    # Debian package -> a command it provides (so hosts with SLURM from elsewhere install nothing)
    local -a want=(slurm-wlm:slurmctld slurm-wlm:slurmd slurm-wlm:sbatch munge:munged procps:ps)
    [ "$ACCOUNTING" = 1 ] && want+=(slurmdbd:slurmdbd mariadb-server:mariadbd mariadb-server:mariadb-install-db)
    local -a missing=()
    local item
    for item in "${want[@]}"; do
        command -v "${item#*:}" >/dev/null 2>&1 && continue
        [[ " ${missing[*]-} " == *" ${item%%:*} "* ]] || missing+=("${item%%:*}")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install them by hand"
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: run as root (apt-get install)"
    say "installing ${missing[*]} (apt-get)"
    # Keep the packages' own services (system munge, mariadb, slurm) from starting: we run our own.
    local policy=/usr/sbin/policy-rc.d added_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; added_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    export DEBIAN_FRONTEND=noninteractive
    local aptlog=$D/log/apt.log
    mkdir -p "$D/log"
    if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } \
            >"$aptlog" 2>&1 </dev/null 9>&-; then
        tail -n 30 "$aptlog" >&2
        die "apt-get install ${missing[*]} failed (log: $aptlog)"
    fi
    if [ $added_policy = 1 ]; then rm -f "$policy"; trap - EXIT; fi
}

# ------------------------------------------------------------------ configuration
# install_if_changed TMPFILE DEST MODE: move TMPFILE to DEST when different; return 0 if changed.
install_if_changed() {
    if [ -f "$2" ] && cmp -s "$1" "$2"; then rm -f "$1"; chmod "$3" "$2"; return 1; fi
    mv "$1" "$2"; chmod "$3" "$2"; return 0
}

write_configs() {
    local host cpus mem_mb tmp
    host=$(hostname -s 2>/dev/null || uname -n)
    cpus=${MLMEGA_SLURM_CPUS:-$(nproc)}
    [ "$cpus" -ge 2 ] || cpus=2
    # All fake nodes share this machine's memory: by default each advertises its share of it.
    mem_mb=${MLMEGA_SLURM_MEM_MB:-$(awk -v n="$NODES" '/^MemTotal:/ {m=int($2/1024/n/100)*100; print (m<1000?1000:m)}' /proc/meminfo)}

    tmp=$(mktemp "$D/etc/.slurm.conf.XXXXXX")
    cat > "$tmp" <<EOF
# Generated by mlmega slurm/local-cluster.sh -- edits are overwritten by the next start.
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# our own munged; cred_expire=10: a requeued job may restart after 11 s instead of 121 s
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/state/slurmd-%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# no cgroups needed: processes tracked through /proc, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MpiDefault=none
ReturnToService=2
InactiveLimit=0
KillWait=5
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
JobCompType=jobcomp/none
# the fake nodes advertise the CPUs/memory below, whatever the hardware says
SlurmdParameters=config_overrides
EOF
    if [ "$ACCOUNTING" = 1 ]; then
        cat >> "$tmp" <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# for slurmdbd connections the munge socket is read from here, not from AuthInfo
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
EOF
    else
        cat >> "$tmp" <<EOF
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
EOF
    fi
    cat >> "$tmp" <<EOF
NodeName=n[1-$NODES] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$((PORT_BASE + 11))-$((PORT_BASE + 10 + NODES))] CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    SLURM_CONF_CHANGED=0
    install_if_changed "$tmp" "$CONF" 644 && SLURM_CONF_CHANGED=1

    tmp=$(mktemp "$D/etc/.slurmdbd.conf.XXXXXX")
    cat > "$tmp" <<EOF
# Generated by mlmega slurm/local-cluster.sh
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=mlmega-local
StorageLoc=slurm_acct_db
EOF
    DBD_CONF_CHANGED=0
    install_if_changed "$tmp" "$DBD_CONF" 600 && DBD_CONF_CHANGED=1
    return 0
}

# ------------------------------------------------------------------ daemons
# Daemons get the lock file closed (9>&-), no terminal and their own stderr file, so that they never
# hold the caller's pipes (subprocess.run(capture_output=True) would otherwise wait for them).
start_munged() {
    if ! running "$D/munge/munged.pid" munged; then
        say "starting munged"
        munged --socket="$MUNGE_SOCKET" --key-file="$D/munge/munge.key" \
            --log-file="$D/munge/munged.log" --pid-file="$D/munge/munged.pid" \
            --seed-file="$D/munge/munged.seed" --num-threads=4 \
            </dev/null >>"$D/log/munged.stderr" 2>&1 9>&- || fail "munged did not start"
    fi
    await munged "$D/munge/munged.pid" munged \
        bash -c "munge -S '$MUNGE_SOCKET' -n | unmunge -S '$MUNGE_SOCKET'"
}

start_accounting() {
    if [ ! -d "$D/db/data/mysql" ]; then
        say "creating the MariaDB data directory"
        rm -rf "$D/db/data"
        mariadb-install-db --no-defaults --user=root --datadir="$D/db/data" \
            --auth-root-authentication-method=normal --skip-test-db \
            >"$D/db/install.out" 2>&1 </dev/null 9>&- || fail "mariadb-install-db failed"
    fi
    # slurmdbd.conf changes only with the ports: restart slurmdbd and MariaDB on their new ports
    if [ "$DBD_CONF_CHANGED" = 1 ] && { running "$D/run/slurmdbd.pid" slurmdbd || running "$D/db/mariadbd.pid" mariadbd; }; then
        say "slurmdbd.conf changed: restarting slurmdbd and mariadbd"
        stop_daemon "$D/run/slurmdbd.pid" slurmdbd
        stop_daemon "$D/db/mariadbd.pid" mariadbd
    fi
    if ! running "$D/db/mariadbd.pid" mariadbd; then
        say "starting mariadbd (127.0.0.1:$DB_PORT)"
        setsid mariadbd --no-defaults --user=root --datadir="$D/db/data" --socket="$DB_SOCKET" \
            --pid-file="$D/db/mariadbd.pid" --bind-address=127.0.0.1 --port="$DB_PORT" \
            --log-error="$D/db/mysqld.err" --innodb-buffer-pool-size=128M \
            --innodb-lock-wait-timeout=900 </dev/null >>"$D/log/mariadbd.stderr" 2>&1 9>&- &
        echo $! > "$D/db/mariadbd.pid"   # same pid (setsid execs); mariadbd rewrites it later
    fi
    await "mariadbd (socket $DB_SOCKET)" "$D/db/mariadbd.pid" mariadbd \
        mariadb-admin --no-defaults -S "$DB_SOCKET" -uroot ping
    mariadb --no-defaults -S "$DB_SOCKET" -uroot -e "
        CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'mlmega-local';
        CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'mlmega-local';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
        GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
        FLUSH PRIVILEGES;" || fail "could not create the slurm database user"

    # slurmdbd reads slurmdbd.conf from the directory of $SLURM_CONF
    if ! running "$D/run/slurmdbd.pid" slurmdbd; then
        say "starting slurmdbd (127.0.0.1:$DBD_PORT)"
        slurmdbd </dev/null >>"$D/log/slurmdbd.stderr" 2>&1 9>&- \
            || fail "slurmdbd did not start"
    fi
    await slurmdbd "$D/run/slurmdbd.pid" slurmdbd sacctmgr -n -P list cluster format=cluster
    # slurmctld registers its cluster itself on first contact; doing it here is quicker and explicit.
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null || fail "sacctmgr add cluster failed"
    fi
}

start_slurm() {
    local i f
    if [ "$SLURM_CONF_CHANGED" = 1 ] && running "$D/run/slurmctld.pid" slurmctld; then
        say "slurm.conf changed: restarting slurmctld and slurmd's (jobs are kept)"
        for f in "$D"/run/slurmd-n*.pid; do [ -e "$f" ] && stop_daemon "$f" slurmd; done
        stop_daemon "$D/run/slurmctld.pid" slurmctld
    fi
    # slurmd's of nodes beyond the configured count (node count lowered)
    for f in "$D"/run/slurmd-n*.pid; do
        [ -e "$f" ] || continue
        i=${f##*/slurmd-n}; i=${i%.pid}
        [ "$i" -le "$NODES" ] 2>/dev/null || stop_daemon "$f" slurmd
    done
    if ! running "$D/run/slurmctld.pid" slurmctld; then
        say "starting slurmctld (127.0.0.1:$CTLD_PORT)"
        slurmctld </dev/null >>"$D/log/slurmctld.stderr" 2>&1 9>&- || fail "slurmctld did not start"
    fi
    await slurmctld "$D/run/slurmctld.pid" slurmctld scontrol ping
    for i in $(seq 1 "$NODES"); do
        if ! running "$D/run/slurmd-n$i.pid" slurmd; then
            say "starting slurmd -N n$i (127.0.0.1:$((PORT_BASE + 10 + i)))"
            slurmd -N "n$i" </dev/null >>"$D/log/slurmd-n$i.stderr" 2>&1 9>&- \
                || fail "slurmd -N n$i did not start"
        fi
    done
}

# Nodes are ready when sinfo reports each of them idle (or busy with jobs, when re-run).
nodes_ready() {
    local ready
    ready=$(sinfo -h -N -o '%N %T' 2>/dev/null \
        | awk '$2 ~ /^(idle|mixed|allocated|completing)$/ {print $1}' | sort -u | wc -l)
    [ "$ready" -ge "$NODES" ]
}

wait_for_nodes() {
    local end=$((SECONDS + TIMEOUT)) waited=0 n
    until nodes_ready; do
        # A node left DOWN/DRAINED by an earlier run (e.g. "Node unexpectedly rebooted"): resume it
        # once its slurmd has had a moment to register.
        if [ $waited -ge 3 ]; then
            for n in $(sinfo -h -N -t down,drain,fail -o '%N' 2>/dev/null | sort -u); do
                scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
            done
        fi
        if [ "$SECONDS" -ge "$end" ]; then
            sinfo -N -l >&2 || true
            fail "nodes not idle after ${TIMEOUT}s"
        fi
        sleep 0.3; waited=$((waited + 1))
    done
}

cmd_start() {
    [[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "MLMEGA_SLURM_NODES must be a positive integer (got '$NODES')"
    [ "$(id -u)" = 0 ] || die "the local cluster runs its daemons as root: run this as root"
    local t0=$SECONDS
    mkdir -p "$D"
    # one `start` at a time (e.g. several test processes calling it together)
    exec 9>"$D/.lock"
    flock -w "$((TIMEOUT * 3))" 9 || die "another start holds $D/.lock"
    ensure_packages
    touch "$MARKER"
    mkdir -p "$D"/{etc,state/ctld,log,run,munge,db}
    for i in $(seq 1 "$NODES"); do mkdir -p "$D/state/slurmd-n$i"; done
    chmod 755 "$D" "$D/munge"   # munged: the socket directory must be searchable by all
    if [ ! -s "$D/munge/munge.key" ]; then
        dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
        chmod 400 "$D/munge/munge.key"
    fi
    write_configs
    export SLURM_CONF=$CONF
    start_munged
    [ "$ACCOUNTING" = 1 ] && start_accounting
    start_slurm
    wait_for_nodes
    say "cluster up: $NODES node(s) in $((SECONDS - t0)) s. Use: eval \"\$($0 env)\""
}

cmd_stop() {
    local wipe=0 jobs
    case "${1:-}" in
        "") ;;
        --wipe) wipe=1 ;;
        *) die "usage: $0 stop [--wipe]" ;;
    esac
    export SLURM_CONF=$CONF
    # Cancel jobs first so their slurmstepd's and user processes go away with them.
    if [ -f "$CONF" ] && running "$D/run/slurmctld.pid" slurmctld; then
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            say "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            retry 20 bash -c '[ -z "$(squeue -h -o %A)" ]' || say "some jobs are still listed"
        fi
    fi
    local f
    for f in "$D"/run/slurmd-n*.pid; do [ -e "$f" ] && stop_daemon "$f" slurmd; done
    stop_daemon "$D/run/slurmctld.pid" slurmctld
    stop_daemon "$D/run/slurmdbd.pid" slurmdbd
    stop_daemon "$D/db/mariadbd.pid" mariadbd
    stop_daemon "$D/munge/munged.pid" munged
    if [ $wipe = 1 ] && [ -d "$D" ]; then
        [ -e "$MARKER" ] || die "$D has no $(basename "$MARKER") marker: not deleting it"
        say "deleting $D"
        rm -rf -- "$D"
    fi
    say "stopped"
}

cmd_env() {
    printf 'export SLURM_CONF=%q\n' "$CONF"
}

cmd_status() {
    local f name
    export SLURM_CONF=$CONF
    echo "directory: $D"
    for f in "$D/munge/munged.pid:munged" "$D/db/mariadbd.pid:mariadbd" "$D/run/slurmdbd.pid:slurmdbd" \
             "$D/run/slurmctld.pid:slurmctld" "$D"/run/slurmd-n*.pid; do
        case $f in *:*) name=${f##*:}; f=${f%:*} ;; *) name=slurmd ;; esac
        [ -e "$f" ] || continue
        if running "$f" "$name"; then state="running (pid $(tr -dc '0-9' < "$f"))"; else state=stopped; fi
        [ "$name" = slurmd ] && name=$(basename "$f" .pid)
        printf '  %-12s %s\n' "$name" "$state"
    done
    if ! running "$D/run/slurmctld.pid" slurmctld; then
        echo "slurmctld is not running: $0 start"
        return 3
    fi
    echo
    sinfo -N -o '%N %P %T %c %m' || true
    echo
    squeue -o '%.8i %.12j %.8T %.10M %.6D %R' || true
}

case "${1:-}" in
    start) shift; cmd_start "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    env) cmd_env ;;
    status) cmd_status ;;
    -h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' ;;
    *) echo "usage: $0 start|stop [--wipe]|env|status   (see --help)" >&2; exit 2 ;;
esac
