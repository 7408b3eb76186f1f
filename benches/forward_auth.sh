#!/usr/bin/env bash
# Forward-auth benchmark: nginx `auth_request` in front of a static upstream, asking
#   (a) this gateway (HS256 JWT, then a service token), or
#   (b) a static nginx location answering 200 — the floor of the pattern,
# in interleaved rounds of the same length, same machine, same nginx; prints requests/s,
# p50/p99, the ratio (a)/(b) per round and the gateway's CPU µs per decision (from
# /proc/PID/stat). Then gRPC `Check` calls per second from a tonic client
# (`benches/ext_authz.rs`). Only 127.0.0.1 is targeted; every process started here is
# stopped by PID on exit.
#
#   bash benches/forward_auth.sh              # 3 rounds of 5 s
#   ROUNDS=5 DURATION=10s bash benches/forward_auth.sh
set -euo pipefail

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
BASE_PORT=${BASE_PORT:-18800}
GW=$BASE_PORT; ADMIN=$((BASE_PORT + 1)); GRPC=$((BASE_PORT + 2))
STATIC=$((BASE_PORT + 3)); VIA_GW=$((BASE_PORT + 4)); VIA_STATIC=$((BASE_PORT + 5))

cd "$(dirname "$0")/.."

source benches/common.sh
install_missing wrk nginx

cargo build --release --quiet
cargo bench --no-run --quiet --bench ext_authz 2>/dev/null
eval "$(cargo bench --quiet --bench jwt -- mint HS256 | sed -n 's/^TOKEN=/HS_TOKEN=/p; s/^SECRET=/SECRET=/p')"


cat > "$work/gateway.yaml" <<CONF
listen: {http: ["127.0.0.1:$GW"]}
admin: {listen: "127.0.0.1:$ADMIN"}
trusted_proxies: ["127.0.0.1"]
forward_auth: {grpc_listen: "127.0.0.1:$GRPC"}
upstreams: {default: {url: "http://127.0.0.1:$STATIC"}}
auth:
  jwt: {secret: "$SECRET"}
  bootstrap: {token: "bench-bootstrap-$$"}
  service_tokens: {backend: sqlite, sqlite_path: "$work/tokens.sqlite"}
routes:
  - {name: scoped, path: "/auth/**", scopes: [workflows:read]}
log: {level: warn}
CONF
ORCHEO_GATEWAY_CONFIG= ./target/release/orcheo-gateway serve -c "$work/gateway.yaml" >"$work/gateway.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")

# One nginx (two worker processes): the static upstream, and the two auth_request fronts.
mkdir -p "$work/logs"
cat > "$work/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $work/nginx.pid;
error_log $work/logs/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work; proxy_temp_path $work; fastcgi_temp_path $work;
  uwsgi_temp_path $work; scgi_temp_path $work;
  keepalive_requests 1000000;
  upstream static { server 127.0.0.1:$STATIC; keepalive 64; }
  upstream gateway { server 127.0.0.1:$GW; keepalive 64; }
  server {
    listen 127.0.0.1:$STATIC;
    location / { default_type text/plain; return 200 'ok'; }
  }
  server {
    listen 127.0.0.1:$VIA_GW;
    location / {
      auth_request /_auth;
      auth_request_set \$orcheo_subject \$upstream_http_x_orcheo_subject;
      proxy_set_header X-Orcheo-Subject \$orcheo_subject;
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_pass http://static;
    }
    location = /_auth {
      internal;
      proxy_pass http://gateway/_orcheo/auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_set_header X-Original-URI \$request_uri;
      proxy_set_header X-Original-Method \$request_method;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_http_version 1.1; proxy_set_header Connection "";
    }
  }
  server {
    listen 127.0.0.1:$VIA_STATIC;
    location / {
      auth_request /_auth;
      proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_pass http://static;
    }
    location = /_auth {
      internal;
      proxy_pass http://static/_auth;
      proxy_pass_request_body off;
      proxy_set_header Content-Length "";
      proxy_http_version 1.1; proxy_set_header Connection "";
    }
  }
}
CONF
nginx -p "$work" -c "$work/nginx.conf" -e "$work/logs/error.log" &
pids+=($!)

for _ in $(seq 50); do
  if curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 \
     && curl -sf "http://127.0.0.1:$STATIC/" >/dev/null 2>&1; then break; fi
  sleep 0.2
done
SERVICE_TOKEN=$(curl -sf -X POST "http://127.0.0.1:$GW/api/admin/service-tokens" \
  -H "Authorization: Bearer bench-bootstrap-$$" -H 'content-type: application/json' \
  -d '{"identifier": "bench", "scopes": ["workflows:read"]}' | sed -n 's/.*"secret":"\([^"]*\)".*/\1/p')
test -n "$SERVICE_TOKEN"
for token in "$HS_TOKEN" "$SERVICE_TOKEN"; do
  test "$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "http://127.0.0.1:$VIA_GW/auth/x")" = 200
done
test "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$VIA_GW/auth/x")" = 401


# Runs wrk against a front with the credential; prints "requests/s p50_ms p99_ms requests".
run() {
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -H "Authorization: Bearer $2" \
    "http://127.0.0.1:$1/auth/bench" > "$work/wrk.out"
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^Requests\/sec/ { rps=$2 }
    /requests in/ { n=$1 }
    /^ +50%/ { p50=ms($2) }
    /^ +99%/ { p99=ms($2) }
    END { printf "%.0f %.3f %.3f %d\n", rps, p50, p99, n }' "$work/wrk.out"
}

wrk -t1 -c8 -d2s -H "Authorization: Bearer $HS_TOKEN" "http://127.0.0.1:$VIA_GW/auth/warm" >/dev/null

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); wrk -t1 -c$CONNECTIONS -d$DURATION, $ROUNDS interleaved rounds"
printf '%-6s %-34s %12s %9s %9s %7s %12s\n' round "nginx auth_request asks" "requests/s" "p50 ms" "p99 ms" ratio "gw CPU µs/req"
for round in $(seq "$ROUNDS"); do
  read -r s_rps s_p50 s_p99 _ < <(run "$VIA_STATIC" "$HS_TOKEN")
  printf '%-6s %-34s %12s %9s %9s %7s %12s\n' "$round" "(b) a static location (floor)" "$s_rps" "$s_p50" "$s_p99" "1.00" "-"
  for case in "(a) the gateway, HS256 JWT|$HS_TOKEN" "(a) the gateway, service token|$SERVICE_TOKEN"; do
    IFS='|' read -r label token <<<"$case"
    before=$(cpu_ticks "$gateway_pid")
    read -r rps p50 p99 n < <(run "$VIA_GW" "$token")
    after=$(cpu_ticks "$gateway_pid")
    ratio=$(awk -v a="$rps" -v b="$s_rps" 'BEGIN { printf "%.2f", a/b }')
    cpu=$(awk -v t=$((after - before)) -v hz="$tick" -v n="$n" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    printf '%-6s %-34s %12s %9s %9s %7s %12s\n' "$round" "$label" "$rps" "$p50" "$p99" "$ratio" "$cpu"
  done
done

echo
echo "gRPC Check (tonic client, one HTTP/2 connection, 64 calls in flight, ${DURATION%s} s):"
secs=${DURATION%s}
for case in "HS256 JWT|$HS_TOKEN" "service token|$SERVICE_TOKEN"; do
  IFS='|' read -r label token <<<"$case"
  before=$(cpu_ticks "$gateway_pid")
  out=$(cargo bench --quiet --bench ext_authz -- "127.0.0.1:$GRPC" "Bearer $token" "$secs" 64)
  after=$(cpu_ticks "$gateway_pid")
  calls=$(awk '{print $2}' <<<"$out")
  cpu=$(awk -v t=$((after - before)) -v hz="$tick" -v r="$calls" -v s="$secs" 'BEGIN { printf "%.1f", t / hz * 1e6 / (r * s) }')
  printf '  %-16s %s, gateway CPU %s µs/check\n' "$label" "$out" "$cpu"
done
