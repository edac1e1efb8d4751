#!/usr/bin/env bash
# Stop the one-node SLURM cluster started by scripts/slurm/start.sh.
#
# Cancels the jobs still queued or running, stops slurmd, then slurmctld, then munged
# (unless --keep-munge), each by the pid in its pid file: SIGTERM, then SIGKILL after
# a bounded wait.  Idempotent: stopping a cluster that is not running is not an error.
# Configuration, state and logs are kept (/etc/slurm, /var/spool/slurm*, /var/log/slurm).
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
RUNDIR=/run/slurm
KEEP_MUNGE=0
for arg in "$@"; do
    case "$arg" in
        --keep-munge) KEEP_MUNGE=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--keep-munge]" >&2; exit 2 ;;
    esac
done

log() { printf '[slurm/stop] %s\n' "$*" >&2; }

# stop_pidfile PIDFILE NAME: TERM the process NAME whose pid is in PIDFILE; KILL after 20 s.
stop_pidfile() {
    local pidfile=$1 name=$2 pid
    [[ -r "$pidfile" ]] || { log "$name: no pid file, not running"; return 0; }
    pid="$(tr -dc '0-9' <"$pidfile")"
    if [[ -z "$pid" ]] || ! kill -0 "$pid" 2>/dev/null \
        || [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name"* ]]; then
        log "$name: not running (stale pid file)"
        rm -f "$pidfile"
        return 0
    fi
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 200); do
        kill -0 "$pid" 2>/dev/null || { rm -f "$pidfile"; return 0; }
        sleep 0.1
    done
    log "$name (pid $pid) ignored SIGTERM for 20s: sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$pidfile"
}

if command -v scontrol >/dev/null && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    njobs="$(squeue -h -t PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED -o %i 2>/dev/null \
        | wc -l)"
    if [[ "$njobs" -gt 0 ]]; then
        log "cancelling $njobs unfinished job(s)"
        scancel --full --state=PENDING 2>/dev/null || true
        scancel --full --state=RUNNING 2>/dev/null || true
        scancel --full --state=SUSPENDED 2>/dev/null || true
        for _ in $(seq 1 30); do
            [[ -z "$(squeue -h -t RUNNING,COMPLETING -o %i 2>/dev/null)" ]] && break
            sleep 0.5
        done
    fi
fi

stop_pidfile "$RUNDIR/slurmd.pid" slurmd
stop_pidfile "$RUNDIR/slurmctld.pid" slurmctld
if [[ $KEEP_MUNGE -eq 0 ]]; then
    stop_pidfile /run/munge/munged.pid munged
fi
log "stopped"
