#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to run the cluster path (hydra/launcher=slurm_cpu) for real on a laptop or
# in CI: Debian's munge, slurmctld, slurmd and slurmdbd (22.05), with MariaDB behind slurmdbd so that `sacct` answers
# (submitit asks sacct for the state of every job: without accounting it warns "Bypassing sacct error" every few
# seconds and never learns that a job was killed, so a sweep with a killed job would wait forever).
#
#   bash scripts/slurm_local.sh            start: install what is missing, write the configs, start what does not run
#                                          yet, wait until the node is idle (idempotent; says what it did)
#   bash scripts/slurm_local.sh --status   what runs, and which of it this script started
#   bash scripts/slurm_local.sh --stop     stop the daemons this script started, by the pids it recorded; nothing else
#
# Needs root (it installs packages and runs the daemons as root, as a single-user test cluster). Everything it owns
# lives under $QH_SLURM_STATE (default /var/lib/quant-harness-slurm): spool and state directories, the database,
# logs, and started/<daemon>.pid for each daemon it started. It writes /etc/slurm/slurm.conf and slurmdbd.conf only
# when they are missing or were written by it (their first line says so); it never touches another cluster's
# configuration, and a controller that already answers is used as it is.
set -euo pipefail

STATE=${QH_SLURM_STATE:-/var/lib/quant-harness-slurm}
DB_PORT=${QH_SLURM_DB_PORT:-3307}     # our own MariaDB on 127.0.0.1 (a system MariaDB, if any, is left alone)
CLUSTER=qhlocal
PARTITION=local
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
MARK="# written by quant-harness scripts/slurm_local.sh"
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
NODE=$(hostname -s)

say() { echo "slurm_local: $*"; }
die() { echo "slurm_local: error: $*" >&2; exit 1; }

# --- pids of the daemons this script started -------------------------------------------------------------------------
started_pid() {  # pid recorded for daemon $1 if that process still runs and is that daemon, else nothing
    local file="$STATE/started/$1.pid" pid
    [[ -f $file ]] || return 0
    pid=$(cat "$file")
    if [[ -n $pid && -r /proc/$pid/comm ]] && grep -q "$1" "/proc/$pid/comm" 2>/dev/null; then
        echo "$pid"
    fi
}

record_started() {  # daemon name, its pid file: remember that we started it
    local i pid=""
    for i in $(seq 1 50); do
        [[ -s $2 ]] && pid=$(cat "$2") && [[ -d /proc/$pid ]] && break
        sleep 0.2
    done
    [[ -n $pid && -d /proc/$pid ]] || die "$1 did not start (see $STATE/log/)"
    mkdir -p "$STATE/started"
    echo "$pid" > "$STATE/started/$1.pid"
    say "started $1 (pid $pid)"
}

start_slurm_daemon() {  # daemon name [readiness check]: start it unless the one we started still runs
    local name=$1 ready=${2:-}
    if [[ -n $(started_pid "$name") ]]; then say "$name already runs (pid $(started_pid "$name"))"; return; fi
    rm -f "$STATE/run/$name.pid"
    "$name"
    record_started "$name" "$STATE/run/$name.pid"
    [[ -z $ready ]] || wait_for 60 "$name" "$ready"
}

wait_for() {  # seconds, description, command...: poll the command until it succeeds
    local seconds=$1 what=$2 i
    shift 2
    for i in $(seq 1 $((seconds * 5))); do
        "$@" > /dev/null 2>&1 && return 0
        sleep 0.2
    done
    die "$what did not come up within ${seconds} s (logs in $STATE/log/)"
}

# --- what answers ----------------------------------------------------------------------------------------------------
munge_answers() { command -v munge > /dev/null && munge -n 2>/dev/null | unmunge > /dev/null 2>&1; }
controller_answers() { command -v scontrol > /dev/null && scontrol ping 2>/dev/null | grep -q "is UP"; }
db_answers() { mariadb-admin --socket="$STATE/db/mysqld.sock" -u root ping > /dev/null 2>&1; }
dbd_answers() { sacctmgr -n list cluster format=cluster > /dev/null 2>&1; }
node_state() { sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1; }

status() {
    local name pid any=0
    for name in munged mariadbd slurmdbd slurmctld slurmd; do
        pid=$(started_pid "$name")
        if [[ -n $pid ]]; then say "$name runs (pid $pid, started by this script)"; any=1; fi
    done
    [[ $any == 1 ]] || say "this script started no daemon that still runs"
    if controller_answers; then
        say "controller answers; node $NODE: $(node_state || true)"
        sinfo 2>/dev/null || true
    else
        say "no SLURM controller answers here"
    fi
}

stop() {
    local name pid i stopped=0
    if [[ -n $(started_pid slurmctld) ]] && controller_answers && [[ -n $(squeue -h 2>/dev/null) ]]; then
        say "jobs are still queued on this cluster: cancelling them before stopping"
        scancel --partition="$PARTITION" 2>/dev/null || true
    fi
    for name in slurmd slurmctld slurmdbd mariadbd munged; do
        pid=$(started_pid "$name")
        rm -f "$STATE/started/$name.pid"
        [[ -n $pid ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        for i in $(seq 1 100); do [[ -d /proc/$pid ]] || break; sleep 0.2; done
        if [[ -d /proc/$pid ]]; then
            kill -KILL "$pid" 2>/dev/null || true
            say "killed $name (pid $pid): it ignored TERM for 20 s"
        else
            say "stopped $name (pid $pid)"
        fi
        stopped=1
    done
    [[ $stopped == 1 ]] || say "nothing to stop: this script started no daemon that still runs"
}

# --- configuration ---------------------------------------------------------------------------------------------------
ours_or_missing() { [[ ! -e $1 ]] || [[ $(head -1 "$1") == "$MARK" ]]; }

write_if_changed() {  # path, mode, content on stdin; returns 0 if the file changed
    local tmp
    tmp=$(mktemp "$1.XXXXXX")
    cat > "$tmp"
    chmod "$2" "$tmp"
    if [[ -f $1 ]] && cmp -s "$tmp" "$1"; then rm -f "$tmp"; return 1; fi
    mv "$tmp" "$1"
    say "wrote $1"
    return 0
}

slurm_conf() {  # this host's cores and memory, one partition; accounting through slurmdbd
    local line cpus mem
    line=$(slurmd -C | head -1)
    cpus=$(sed -n 's/.* CPUs=\([0-9]*\).*/\1/p' <<< "$line")
    mem=$(sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p' <<< "$line")
    mem=$((mem * 95 / 100))  # below what slurmd measures, or a node whose free memory dips is drained
    cat <<EOF
$MARK
# A one-node test cluster on $NODE: $cpus CPUs, $mem MB. Every path below belongs to that script ($STATE).
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((mem / cpus))
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

slurmdbd_conf() {
    cat <<EOF
$MARK
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$STATE/db.pass")
StorageLoc=slurm_acct_db
EOF
}

# --- start -----------------------------------------------------------------------------------------------------------
start() {
    [[ $(id -u) == 0 ]] || die "needs root: it installs packages and runs the daemons (try: sudo bash $0)"
    if controller_answers && [[ -z $(started_pid slurmctld) ]]; then
        say "a SLURM controller already answers here and this script did not start it: using it as it is"
        say "node $NODE: $(node_state || echo 'not in this cluster')"
        sinfo
        return 0
    fi
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do dpkg -s "$pkg" > /dev/null 2>&1 || missing+=("$pkg"); done
    if (( ${#missing[@]} )); then
        say "installing ${missing[*]}"
        apt-get update -q > /dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" > /dev/null
    else
        say "packages already installed: ${PACKAGES[*]}"
    fi
    for conf in "$CONF" "$DBD_CONF"; do
        ours_or_missing "$conf" || die "$conf exists and was not written by this script, and no controller answers:" \
            "start that cluster yourself, or move the file aside and run this again"
    done
    mkdir -p "$STATE"/{slurmctld,slurmd,run,log,started} /etc/slurm
    chmod 755 "$STATE"

    # munge: the cluster's authentication
    if munge_answers; then say "munged already answers"
    else
        mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
        if [[ ! -f /etc/munge/munge.key ]]; then
            mungekey --create --keyfile=/etc/munge/munge.key
            chown munge:munge /etc/munge/munge.key
        fi
        runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
        record_started munged /run/munge/munged.pid
        wait_for 20 munged munge_answers
    fi

    # MariaDB for slurmdbd: our own data directory and port
    if [[ -n $(started_pid mariadbd) ]]; then say "mariadbd already runs (pid $(started_pid mariadbd))"
    else
        mkdir -p "$STATE/db" && chown mysql:mysql "$STATE/db"
        if [[ ! -d $STATE/db/data/mysql ]]; then
            mkdir -p "$STATE/db/data" && chown mysql:mysql "$STATE/db/data"
            mariadb-install-db --user=mysql --datadir="$STATE/db/data" --auth-root-authentication-method=socket \
                --skip-test-db > "$STATE/log/mariadb-install.log" 2>&1
            say "initialized the accounting database in $STATE/db/data"
        fi
        runuser -u mysql -- /usr/sbin/mariadbd --no-defaults --datadir="$STATE/db/data" \
            --socket="$STATE/db/mysqld.sock" --pid-file="$STATE/db/mariadbd.pid" --port="$DB_PORT" \
            --bind-address=127.0.0.1 --innodb-lock-wait-timeout=900 --log-error="$STATE/db/mariadb.log" \
            > /dev/null 2>&1 &
        record_started mariadbd "$STATE/db/mariadbd.pid"
        wait_for 60 mariadbd db_answers
    fi
    if [[ ! -s $STATE/db.pass ]]; then
        (umask 077; head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$STATE/db.pass")
    fi
    mariadb --socket="$STATE/db/mysqld.sock" -u root -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1';
        ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$(cat "$STATE/db.pass")';
        CREATE DATABASE IF NOT EXISTS slurm_acct_db; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

    local changed=0
    slurmdbd_conf | write_if_changed "$DBD_CONF" 600 && changed=1 || true
    slurm_conf | write_if_changed "$CONF" 644 && changed=1 || true
    if [[ $changed == 1 ]]; then
        for name in slurmd slurmctld slurmdbd; do
            pid=$(started_pid "$name")
            if [[ -n $pid ]]; then
                say "configuration changed: restarting $name (pid $pid)"
                kill -TERM "$pid"; while [[ -d /proc/$pid ]]; do sleep 0.2; done
                rm -f "$STATE/started/$name.pid"
            fi
        done
    fi

    start_slurm_daemon slurmdbd dbd_answers
    start_slurm_daemon slurmctld controller_answers
    start_slurm_daemon slurmd

    local state i
    for i in $(seq 1 150); do
        state=$(node_state || true)
        case $state in
            idle*|mixed*|allocated*) break ;;
            down*|drain*) scontrol update nodename="$NODE" state=resume 2>/dev/null || true ;;
        esac
        sleep 0.4
    done
    case $state in
        idle*|mixed*|allocated*) ;;
        *) die "node $NODE is '$state' after 60 s (see $STATE/log/slurmd.log, slurmctld.log)" ;;
    esac
    say "SLURM is up: node $NODE is $state in partition '$PARTITION' of cluster '$CLUSTER' (accounting: sacct works)"
    sinfo
    say "stop it with: bash $0 --stop"
}

case "${1:-}" in
    "") start ;;
    --stop) stop ;;
    --status) status ;;
    -h|--help) sed -n '2,19p' "$0" ;;
    *) die "unknown argument '$1'; allowed: (none), --status, --stop" ;;
esac
