# Shared by launch/single_node.sh and launch/multinode.sh (sourced, not run).
#
# run_torchrun ARGS...  runs `python -m torch.distributed.run ARGS...` and stops it gracefully:
#   SIGTERM or SIGINT to the launcher -> SIGTERM to the training workers, which save a checkpoint and exit 0.
#   A second SIGINT (Ctrl-C twice) kills the workers instead.
# Why not `exec torchrun`: torchrun handles SIGTERM itself by forwarding it, waiting 30 s, SIGKILLing the workers and
# exiting 1 even when they saved cleanly. So torchrun starts with SIGTERM and SIGINT ignored (and not in its
# --signals-to-handle), and this launcher signals the workers directly; torchrun then sees them exit 0 and exits 0.
# SLURM signals every process of a step at preemption: torchrun ignores it, the workers and the launcher act on it.

PYTHON=${PYTHON:-$(command -v python || command -v python3 || echo python)}
STOP_RESEND_S=${STOP_RESEND_S:-15}

die() {
    echo "$(basename "$0"): $*" >&2
    echo "Run $(basename "$0") --help for usage." >&2
    exit 2
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# `SCRIPT -h|--help` prints the calling script's header comment (line 2 up to `set -euo`) and exits.
exit_on_help() {
    case ${1:-} in
    -h | --help)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    esac
}

check_max_restarts() {
    is_uint "${MAX_RESTARTS:-0}" || die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"
}

# One worker per visible GPU, or one on a machine without CUDA.
default_nproc() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count() or 1)'
}

# $NPROC_PER_NODE checked, or the default.
nproc_per_node() {
    local n=${NPROC_PER_NODE:-}
    if [[ -z $n ]]; then
        n=$(default_nproc) || die "could not count GPUs with $PYTHON (is torch installed?); set NPROC_PER_NODE"
    fi
    is_uint "$n" && ((n > 0)) || die "NPROC_PER_NODE must be a positive integer, got '$n'"
    echo "$n"
}

_TR_PID=""
_STOPS=0
_RESENDER=""

# The training workers: torchrun's child processes.
_workers() {
    if command -v pgrep >/dev/null 2>&1; then
        pgrep -P "$_TR_PID" || true
    else
        cat /proc/"$_TR_PID"/task/*/children 2>/dev/null || true
    fi
}

_signal_workers() {
    local pids
    pids=$(_workers)
    [[ -z $pids ]] && return 1
    # shellcheck disable=SC2086  # one pid per word
    kill "-$1" $pids 2>/dev/null || true
}

_on_stop() {
    _STOPS=$((_STOPS + 1))
    local me
    me=$(basename "$0")
    if [[ $1 == INT && $_STOPS -gt 1 ]]; then
        echo "$me: second interrupt: killing the workers without a checkpoint" >&2
        _signal_workers KILL || true
        kill -HUP "$_TR_PID" 2>/dev/null || true
        return 0
    fi
    if _signal_workers TERM; then
        echo "$me: SIG$1: the workers save a checkpoint and stop (the next launch with train.resume=auto resumes)" >&2
    else
        echo "$me: SIG$1 before any worker started: nothing to save, stopping torchrun" >&2
        kill -HUP "$_TR_PID" 2>/dev/null || true
        return 0
    fi
    # A worker that had not yet installed its SIGTERM handler ignored the signal (inherited SIG_IGN): say it again.
    if [[ -z $_RESENDER ]]; then
        # It ends with torchrun, even if this launcher is killed first.
        (while sleep "$STOP_RESEND_S" </dev/null >/dev/null 2>&1 && kill -0 "$_TR_PID" 2>/dev/null; do
            _signal_workers TERM || true
        done) &
        _RESENDER=$!
    fi
}

run_torchrun() {
    echo "$(basename "$0"): $PYTHON -m torch.distributed.run $*" >&2
    (
        trap '' TERM INT
        exec "$PYTHON" -m torch.distributed.run --signals-to-handle=SIGHUP,SIGQUIT "$@"
    ) &
    _TR_PID=$!
    # `|| true`: a failing trap action (a bare `return` in a handler returns the interrupted wait's 143) would,
    # under set -e, end this script and orphan torchrun.
    trap '_on_stop TERM || true' TERM
    trap '_on_stop INT || true' INT
    # A trapped signal interrupts `wait` while torchrun still runs: wait again until it has exited.
    while kill -0 "$_TR_PID" 2>/dev/null; do
        wait "$_TR_PID" || true
    done
    local rc=0
    wait "$_TR_PID" || rc=$?
    trap - TERM INT
    if [[ -n $_RESENDER ]]; then
        pkill -P "$_RESENDER" 2>/dev/null || true  # its sleep
        kill "$_RESENDER" 2>/dev/null || true
    fi
    return "$rc"
}
