# Shared by the benchmark scripts (sourced from the repository root): the tools they
# drive, installed when missing; a work directory and the processes started, stopped by
# PID on exit; per-process CPU and memory readings from /proc.

# Installs with apt-get whichever of the commands given (Debian packages of the same
# name) is not on the PATH.
install_missing() {
  local missing=() name
  for name in "$@"; do
    command -v "$name" >/dev/null 2>&1 || missing+=("$name")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "installing ${missing[*]} (apt-get)…" >&2
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
}

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# proc_sum PID FILE AWK: the sum, over a process and its children (nginx's workers), of
# what the awk program prints from /proc/PID/FILE.
proc_sum() {
  local total=0 pid
  for pid in "$1" $(pgrep -P "$1" || true); do
    total=$((total + $(awk "$3" "/proc/$pid/$2")))
  done
  echo "$total"
}
# CPU ticks (utime+stime) of a process and its children.
cpu_ticks() { proc_sum "$1" stat '{print $14 + $15}'; }
# RSS in KiB of a process and its children.
rss_kib() { proc_sum "$1" status '/^VmRSS/ {print $2}'; }
tick=$(getconf CLK_TCK)
