#!/usr/bin/env bash
# Load benchmark: the same nginx upstream on 127.0.0.1, directly and through the gateway
# (a public route, then a route needing a scope with an HS256 and with an RS256 JWT),
# driven by wrk for a bounded time. Prints requests/s, p50/p99 latency and the ratio to
# direct. Only 127.0.0.1 is ever targeted; every process started here is stopped by PID
# on exit.
#
#   bash benches/proxy_load.sh            # 10 s per run
#   DURATION=30s CONNECTIONS=128 bash benches/proxy_load.sh
set -euo pipefail

DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-1}
UPSTREAM_PORT=${UPSTREAM_PORT:-18700}
GATEWAY_PORT=${GATEWAY_PORT:-18701}
ADMIN_PORT=${ADMIN_PORT:-18702}

cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need nginx; then
  echo "installing wrk and nginx (apt-get)…" >&2
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk nginx-light >/dev/null 2>&1 \
    || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk nginx >/dev/null
fi

cargo build --release --quiet
# Test tokens (and the matching secret and JWKS) from the JWT benchmark binary.
eval "$(cargo bench --quiet --bench jwt -- mint HS256 | sed -n 's/^TOKEN=/HS_TOKEN=/p; s/^SECRET=/SECRET=/p')"
eval "$(cargo bench --quiet --bench jwt -- mint RS256 | sed -n 's/^TOKEN=/RS_TOKEN=/p')"
JWKS=$(cargo bench --quiet --bench jwt -- mint RS256 | sed -n 's/^JWKS=//p')

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

mkdir -p "$work/logs"
cat > "$work/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $work/nginx.pid;
error_log $work/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work;
  proxy_temp_path $work;
  fastcgi_temp_path $work;
  uwsgi_temp_path $work;
  scgi_temp_path $work;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UPSTREAM_PORT;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
CONF
nginx -p "$work" -c "$work/nginx.conf" &
pids+=($!)

cat > "$work/gateway.yaml" <<CONF
listen: {http: ["127.0.0.1:$GATEWAY_PORT"]}
admin: {listen: "127.0.0.1:$ADMIN_PORT"}
upstreams: {default: {url: "http://127.0.0.1:$UPSTREAM_PORT"}}
auth:
  jwt: {secret: "$SECRET", jwks: '$JWKS'}
  bootstrap: {token: "bench-bootstrap-$$"}
  service_tokens: {sqlite_path: "$work/tokens.sqlite"}
routes:
  - {name: public, path: "/public/**", public: true}
  - {name: scoped, path: "/auth/**", scopes: [workflows:read]}
log: {level: warn}
CONF
ORCHEO_GATEWAY_CONFIG= ./target/release/orcheo-gateway serve -c "$work/gateway.yaml" >"$work/gateway.log" 2>&1 &
pids+=($!)

# The same gateway with every limit on: the failure limit per IP (checked on each
# request) and a route limit too high to trip (recorded on each request).
LIMITED_PORT=$((GATEWAY_PORT + 10))
sed -e "s/127.0.0.1:$GATEWAY_PORT/127.0.0.1:$LIMITED_PORT/" -e "s|$work/tokens.sqlite|$work/limited-tokens.sqlite|" -e "s/127.0.0.1:$ADMIN_PORT/127.0.0.1:$((ADMIN_PORT + 10))/" \
    -e 's|{name: public, path: "/public/\*\*", public: true}|{name: public, path: "/public/**", public: true, rate_limit: {per: ip, requests: 100000000, window: 1s}}|' \
    -e '/^  jwt:/a\  rate_limit: {ip: 1000000, identity: 1000000, interval: 60}' \
    "$work/gateway.yaml" > "$work/limited.yaml"
ORCHEO_GATEWAY_CONFIG= ./target/release/orcheo-gateway serve -c "$work/limited.yaml" >"$work/limited.log" 2>&1 &
pids+=($!)

for _ in $(seq 50); do
  if curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 \
     && curl -sf "http://127.0.0.1:$((ADMIN_PORT + 10))/readyz" >/dev/null 2>&1 \
     && curl -sf "http://127.0.0.1:$UPSTREAM_PORT/" >/dev/null 2>&1; then break; fi
  sleep 0.2
done

# Runs wrk (with an optional Authorization header) and prints "requests/s p50_ms p99_ms".
run() {
  if [ -n "${2:-}" ]; then
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer $2" "$1" > "$work/wrk.out"
  else
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$1" > "$work/wrk.out"
  fi
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^Requests\/sec/ { rps=$2 }
    /^ +50%/ { p50=ms($2) }
    /^ +99%/ { p99=ms($2) }
    END { printf "%.0f %.3f %.3f\n", rps, p50, p99 }' "$work/wrk.out"
}

# Short warm-up so pools and caches are filled before measuring.
wrk -t1 -c8 -d2s "http://127.0.0.1:$GATEWAY_PORT/public/warm" >/dev/null
wrk -t1 -c8 -d2s "http://127.0.0.1:$LIMITED_PORT/public/warm" >/dev/null
test "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $RS_TOKEN" "http://127.0.0.1:$GATEWAY_PORT/auth/x")" = 200
# A service token, created through the admin API with the bootstrap token.
SERVICE_TOKEN=$(curl -sf -X POST "http://127.0.0.1:$GATEWAY_PORT/api/admin/service-tokens" \
  -H "Authorization: Bearer bench-bootstrap-$$" -H 'content-type: application/json' \
  -d '{"identifier": "bench", "scopes": ["workflows:read"]}' | sed -n 's/.*"secret":"\([^"]*\)".*/\1/p')
test -n "$SERVICE_TOKEN"

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m)"
echo "load: wrk -t$THREADS -c$CONNECTIONS -d$DURATION, small JSON response from nginx"
printf '%-22s %12s %10s %10s %8s\n' "target" "requests/s" "p50 ms" "p99 ms" "ratio"
read -r d_rps d_p50 d_p99 < <(run "http://127.0.0.1:$UPSTREAM_PORT/bench")
printf '%-22s %12s %10s %10s %8s\n' "direct" "$d_rps" "$d_p50" "$d_p99" "1.00"
for case in "gateway, public route|$GATEWAY_PORT/public/bench|" \
            "gateway, HS256 JWT|$GATEWAY_PORT/auth/bench|$HS_TOKEN" \
            "gateway, RS256 JWT|$GATEWAY_PORT/auth/bench|$RS_TOKEN" \
            "gateway, service token|$GATEWAY_PORT/auth/bench|$SERVICE_TOKEN" \
            "limits on, public|$LIMITED_PORT/public/bench|"; do
  IFS='|' read -r label target token <<<"$case"
  read -r rps p50 p99 < <(run "http://127.0.0.1:$target" "$token")
  ratio=$(awk -v g="$rps" -v d="$d_rps" 'BEGIN { printf "%.2f", g/d }')
  printf '%-22s %12s %10s %10s %8s\n' "$label" "$rps" "$p50" "$p99" "$ratio"
done
