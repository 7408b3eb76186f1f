#!/usr/bin/env bash
# Load benchmark, measured beside the peers in the same run: one nginx upstream answering
# a small body, reached (1) directly, (2) through nginx `proxy_pass` (keepalive pool,
# 2 workers, access_log off), (3) through HAProxy with `jwt_verify` (HS256, RS256;
# 2 threads), (4) through the floor of this stack (`benches/hyper_floor.rs`: the least a
# hyper proxy built like the gateway does, with nothing of the gateway's own), and (5)
# through this gateway (public route, HS256 JWT, RS256 JWT, service token), and (6)
# nginx, the floor and the gateway terminating TLS 1.3 (ECDSA P-256 certificate),
# kept-alive and with a new connection per request. Every target runs once per round,
# rounds interleaved, so the machine's drift hits all alike; each line shows requests/s,
# p50/p99, the ratio to nginx in that round (plain rows to nginx `proxy_pass`, TLS rows to
# nginx over TLS the same way) and the proxy's own CPU µs per request (utime+stime from
# /proc). Then WebSocket echo messages/s through nginx and through the gateway (32
# connections, one message in flight each), and the RSS each proxy spends per idle
# keep-alive connection (beside a bare hyper server answering by itself, and the floor,
# which keeps an upstream connection per client connection) and per idle WebSocket
# (N open, held). Only 127.0.0.1 is
# targeted; every process started here is stopped by PID.
#
#   bash benches/proxy_load.sh                     # 3 rounds of 5 s, 5 000 idle connections
#   ROUNDS=5 DURATION=10s IDLE=2000 bash benches/proxy_load.sh
set -euo pipefail

DURATION=${DURATION:-5s}
ROUNDS=${ROUNDS:-3}
CONNECTIONS=${CONNECTIONS:-64}
IDLE=${IDLE:-5000}
HOLD=${HOLD:-20}
BASE=${BASE_PORT:-18700}
UPSTREAM=$BASE; NGINX=$((BASE + 1)); HAPROXY=$((BASE + 2)); GATEWAY=$((BASE + 3))
ADMIN=$((BASE + 4)); NGINX_TLS=$((BASE + 5)); GATEWAY_TLS=$((BASE + 6)); WS_ECHO=$((BASE + 7))
GATEWAY_RL=$((BASE + 8)); ADMIN_RL=$((BASE + 9)); FLOOR=$((BASE + 10)); FLOOR_TLS=$((BASE + 11))
SERVER_ONLY=$((BASE + 12))
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379}
WS_CONNECTIONS=${WS_CONNECTIONS:-32}

cd "$(dirname "$0")/.."

source benches/common.sh
install_missing wrk nginx haproxy
command -v redis-cli >/dev/null 2>&1 || install_missing redis-tools
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release --quiet
WS_BENCH=$(cargo bench --bench websocket --no-run 2>&1 | sed -n 's/.*(\(target\/release\/deps\/websocket-[0-9a-f]*\)).*/\1/p' | head -1)
test -x "$WS_BENCH"
FLOOR_BENCH=$(cargo bench --bench hyper_floor --no-run 2>&1 | sed -n 's/.*(\(target\/release\/deps\/hyper_floor-[0-9a-f]*\)).*/\1/p' | head -1)
test -x "$FLOOR_BENCH"
eval "$(cargo bench --quiet --bench jwt -- mint HS256 | sed -n 's/^TOKEN=/HS_TOKEN=/p; s/^SECRET=/SECRET=/p')"
eval "$(cargo bench --quiet --bench jwt -- mint RS256 | sed -n 's/^TOKEN=/RS_TOKEN=/p')"
JWKS=$(cargo bench --quiet --bench jwt -- mint RS256 | sed -n 's/^JWKS=//p')

openssl rsa -in tests/data/keys/rsa.pem -pubout -out "$work/rsa.pub.pem" 2>/dev/null
printf '%s' "$SECRET" > "$work/hs.secret"
# One certificate for both TLS terminators: ECDSA P-256, TLS 1.3 on both.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
  -subj /CN=localhost -keyout "$work/tls.key" -out "$work/tls.crt" 2>/dev/null

# The WebSocket echo upstream.
"$WS_BENCH" serve-echo "$WS_ECHO" >/dev/null 2>&1 &
pids+=($!)

# The upstream (1 worker) and nginx proxy_pass (2 workers, a pool of kept-alive upstream
# connections): two nginx instances, so each proxy's CPU is its own.
mkdir -p "$work/up" "$work/px"
cat > "$work/up/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $work/up; proxy_temp_path $work/up; fastcgi_temp_path $work/up;
  uwsgi_temp_path $work/up; scgi_temp_path $work/up;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$UPSTREAM;
    location / { default_type application/json; return 200 '{"ok":true}'; }
  }
}
CONF
cat > "$work/px/nginx.conf" <<CONF
worker_processes 2;
daemon off;
pid $work/px/nginx.pid;
error_log $work/px/error.log warn;
events { worker_connections 16384; }
http {
  access_log off;
  client_body_temp_path $work/px; proxy_temp_path $work/px; fastcgi_temp_path $work/px;
  uwsgi_temp_path $work/px; scgi_temp_path $work/px;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  upstream backend { server 127.0.0.1:$UPSTREAM; keepalive 64; }
  upstream wsecho { server 127.0.0.1:$WS_ECHO; }
  server {
    listen 127.0.0.1:$NGINX;
    listen 127.0.0.1:$NGINX_TLS ssl;
    ssl_certificate $work/tls.crt;
    ssl_certificate_key $work/tls.key;
    ssl_protocols TLSv1.3;
    location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection ""; }
    location /ws/ {
      proxy_pass http://wsecho; proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection upgrade;
      proxy_read_timeout 3600s;
    }
  }
}
CONF
nginx -p "$work/up" -c "$work/up/nginx.conf" -e "$work/up/error.log" &
pids+=($!)
start_nginx() {
  nginx -p "$work/px" -c "$work/px/nginx.conf" -e "$work/px/error.log" &
  nginx_pid=$!
  pids+=("$nginx_pid")
}
start_nginx

# HAProxy verifying the JWT itself: HS256 on /hs, RS256 on /rs.
cat > "$work/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 60s
  timeout http-keep-alive 120s
frontend bench
  bind 127.0.0.1:$HAPROXY
  http-request set-var(txn.bearer) http_auth_bearer
  http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg')
  acl hs path_beg /hs
  acl rs path_beg /rs
  http-request deny if hs !{ var(txn.bearer),jwt_verify(txn.alg,"$(cat "$work/hs.secret")") -m int 1 }
  http-request deny if rs !{ var(txn.bearer),jwt_verify(txn.alg,"$work/rsa.pub.pem") -m int 1 }
  default_backend upstream
backend upstream
  http-reuse always
  server up 127.0.0.1:$UPSTREAM
CONF
start_haproxy() {
  haproxy -f "$work/haproxy.cfg" -db >/dev/null 2>"$work/haproxy.log" &
  haproxy_pid=$!
  pids+=("$haproxy_pid")
}
start_haproxy

# The floor: a minimal hyper proxy, one worker per CPU like the gateway; a second one
# terminating TLS with the same certificate (rustls, as the gateway).
start_floor() {
  "$FLOOR_BENCH" "127.0.0.1:$FLOOR" "127.0.0.1:$UPSTREAM" "$(nproc)" >/dev/null 2>&1 &
  floor_pid=$!
  pids+=("$floor_pid")
}
start_floor
"$FLOOR_BENCH" "127.0.0.1:$FLOOR_TLS" "127.0.0.1:$UPSTREAM" "$(nproc)" "$work/tls.crt" "$work/tls.key" >/dev/null 2>&1 &
floor_tls_pid=$!
pids+=("$floor_tls_pid")

cat > "$work/gateway.yaml" <<CONF
listen: {http: ["127.0.0.1:$GATEWAY"], https: ["127.0.0.1:$GATEWAY_TLS"]}
tls: {cert_file: "$work/tls.crt", key_file: "$work/tls.key"}
admin: {listen: "127.0.0.1:$ADMIN"}
limits: {max_connections: 20000}
upstreams:
  default: {url: "http://127.0.0.1:$UPSTREAM"}
  wsecho: {url: "http://127.0.0.1:$WS_ECHO"}
auth:
  jwt: {secret: "$SECRET", jwks: '$JWKS'}
  bootstrap: {token: "bench-bootstrap-$$"}
  service_tokens: {sqlite_path: "$work/tokens.sqlite"}
routes:
  - {name: public, path: "/public/**", public: true}
  - {name: scoped, path: "/auth/**", scopes: [workflows:read]}
  - {name: ws, path: "/ws/**", websocket: true, upstream: wsecho, scopes: [workflows:read]}
log: {level: warn}
CONF
start_gateway() {
  ORCHEO_GATEWAY_CONFIG= ./target/release/orcheo-gateway serve -c "$work/gateway.yaml" >>"$work/gateway.log" 2>&1 &
  gateway_pid=$!
  pids+=("$gateway_pid")
}
start_gateway

# A second gateway with the failure limits on: shared through Redis when one answers
# at REDIS_URL, to compare with the same traffic with limits off.
rl_gateway_pid=""
redis_host=${REDIS_URL#redis://}; redis_host=${redis_host%%/*}
if (exec 3<>"/dev/tcp/${redis_host%:*}/${redis_host#*:}") 2>/dev/null; then
  sed -e "s|127.0.0.1:$GATEWAY\"\]|127.0.0.1:$GATEWAY_RL\"]|; s|, https: \[\"127.0.0.1:$GATEWAY_TLS\"\]||" \
      -e "s|127.0.0.1:$ADMIN|127.0.0.1:$ADMIN_RL|" \
      -e "s|^auth:|auth:\n  rate_limit: {ip: 1000, identity: 1000, redis_url: \"$REDIS_URL\"}|" \
      "$work/gateway.yaml" > "$work/gateway-rl.yaml"
  ORCHEO_GATEWAY_CONFIG= ./target/release/orcheo-gateway serve -c "$work/gateway-rl.yaml" >"$work/gateway-rl.log" 2>&1 &
  rl_gateway_pid=$!
  pids+=("$rl_gateway_pid")
fi

wait_ready() {
  for _ in $(seq 150); do
    if curl -sf "http://127.0.0.1:$ADMIN/readyz" >/dev/null 2>&1 \
       && curl -sf "http://127.0.0.1:$NGINX/" >/dev/null 2>&1 \
       && curl -sf "http://127.0.0.1:$HAPROXY/" >/dev/null 2>&1 \
       && curl -sf "http://127.0.0.1:$FLOOR/" >/dev/null 2>&1 \
       && curl -sfk "https://127.0.0.1:$FLOOR_TLS/" >/dev/null 2>&1 \
       && { [ -z "$rl_gateway_pid" ] || curl -sf "http://127.0.0.1:$ADMIN_RL/readyz" >/dev/null 2>&1; }; then break; fi
    sleep 0.2
  done
  for check in "gateway|http://127.0.0.1:$ADMIN/readyz|$work/gateway.log" \
               "nginx|http://127.0.0.1:$NGINX/|$work/px/error.log" \
               "HAProxy|http://127.0.0.1:$HAPROXY/|$work/haproxy.log" \
               "hyper floor|http://127.0.0.1:$FLOOR/|/dev/null" \
               "hyper floor TLS|https://127.0.0.1:$FLOOR_TLS/|/dev/null" \
               ${rl_gateway_pid:+"Redis-limited gateway|http://127.0.0.1:$ADMIN_RL/readyz|$work/gateway-rl.log"}; do
    IFS='|' read -r label url log <<<"$check"
    if ! curl -sfk "$url" >/dev/null 2>&1; then
      echo "$label is not ready after 30 s ($url); its log:" >&2
      tail -20 "$log" >&2
      exit 1
    fi
  done
}
wait_ready
SERVICE_TOKEN=$(curl -sf -X POST "http://127.0.0.1:$GATEWAY/api/admin/service-tokens" \
  -H "Authorization: Bearer bench-bootstrap-$$" -H 'content-type: application/json' \
  -d '{"identifier": "bench", "scopes": ["workflows:read"]}' | sed -n 's/.*"secret":"\([^"]*\)".*/\1/p')
test -n "$SERVICE_TOKEN"
for check in "$GATEWAY/auth/x|$RS_TOKEN|200" "$GATEWAY/auth/x||401" \
             "$HAPROXY/hs/x|$HS_TOKEN|200" "$HAPROXY/rs/x|$RS_TOKEN|200" "$HAPROXY/hs/x|$RS_TOKEN|403"; do
  IFS='|' read -r target token want <<<"$check"
  got=$(curl -s -o /dev/null -w '%{http_code}' ${token:+-H "Authorization: Bearer $token"} "http://127.0.0.1:$target" || true)
  if [ "$got" != "$want" ]; then
    echo "sanity check failed: $target gave $got, not $want" >&2
    cat "$work/haproxy.log" >&2
    exit 1
  fi
done


# wrk against a URL with an optional credential: "requests/s p50_ms p99_ms requests".
run() {
  wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency ${2:+-H "Authorization: Bearer $2"} \
    ${3:+-H "$3"} "$1" > "$work/wrk.out"
  awk '
    function ms(v) { if (v ~ /us$/) return v/1000; if (v ~ /ms$/) return v+0; if (v ~ /s$/) return v*1000; return v }
    /^Requests\/sec/ { rps=$2 }
    /requests in/ { n=$1 }
    /^ +50%/ { p50=ms($2) }
    /^ +99%/ { p99=ms($2) }
    END { printf "%.0f %.3f %.3f %d\n", rps, p50, p99, n }' "$work/wrk.out"
}

for target in "http://127.0.0.1:$NGINX" "http://127.0.0.1:$HAPROXY/hs" "http://127.0.0.1:$FLOOR" \
              "http://127.0.0.1:$GATEWAY/public" \
              "https://127.0.0.1:$NGINX_TLS" "https://127.0.0.1:$GATEWAY_TLS/public" \
              "https://127.0.0.1:$FLOOR_TLS" \
              ${rl_gateway_pid:+"http://127.0.0.1:$GATEWAY_RL/auth"}; do
  wrk -t1 -c8 -d1s -H "Authorization: Bearer $HS_TOKEN" "$target/warm" >/dev/null
done

echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); wrk -t1 -c$CONNECTIONS -d$DURATION; $ROUNDS interleaved rounds"
printf '%-5s %-42s %11s %8s %8s %9s %9s\n' round target "requests/s" "p50 ms" "p99 ms" "vs nginx" "CPU µs/req"
# label | URL | credential | extra header | process | baseline group: "=G" sets G, "G" compares to it
close="Connection: close"
cases=(
  "upstream directly|http://127.0.0.1:$UPSTREAM/bench|||-|"
  "nginx proxy_pass, no auth|http://127.0.0.1:$NGINX/bench|||$nginx_pid|=plain"
  "HAProxy jwt_verify HS256|http://127.0.0.1:$HAPROXY/hs/bench|$HS_TOKEN||$haproxy_pid|plain"
  "HAProxy jwt_verify RS256|http://127.0.0.1:$HAPROXY/rs/bench|$RS_TOKEN||$haproxy_pid|plain"
  "hyper floor: minimal hyper proxy, no auth|http://127.0.0.1:$FLOOR/bench|||$floor_pid|plain"
  "gateway, public route|http://127.0.0.1:$GATEWAY/public/bench|||$gateway_pid|plain"
  "gateway, HS256 JWT|http://127.0.0.1:$GATEWAY/auth/bench|$HS_TOKEN||$gateway_pid|plain,=hs"
  "gateway, RS256 JWT|http://127.0.0.1:$GATEWAY/auth/bench|$RS_TOKEN||$gateway_pid|plain"
  "gateway, service token|http://127.0.0.1:$GATEWAY/auth/bench|$SERVICE_TOKEN||$gateway_pid|plain"
  "gateway, HS256, Redis-shared limits (vs HS256)|http://127.0.0.1:$GATEWAY_RL/auth/bench|$HS_TOKEN||${rl_gateway_pid:-skip}|hs"
  "nginx TLS proxy_pass, keep-alive|https://127.0.0.1:$NGINX_TLS/bench|||$nginx_pid|=tls"
  "hyper floor TLS, keep-alive|https://127.0.0.1:$FLOOR_TLS/bench|||$floor_tls_pid|tls"
  "gateway TLS, HS256 JWT, keep-alive|https://127.0.0.1:$GATEWAY_TLS/auth/bench|$HS_TOKEN||$gateway_pid|tls"
  "nginx TLS proxy_pass, connection/request|https://127.0.0.1:$NGINX_TLS/bench||$close|$nginx_pid|=tlsnew"
  "hyper floor TLS, connection/request|https://127.0.0.1:$FLOOR_TLS/bench||$close|$floor_tls_pid|tlsnew"
  "gateway TLS, HS256, connection/request|https://127.0.0.1:$GATEWAY_TLS/auth/bench|$HS_TOKEN|$close|$gateway_pid|tlsnew"
)
# Commands the Redis server has processed so far (every client's), to show how many a
# request through the Redis-shared gateway makes.
redis_commands() {
  redis-cli -u "$REDIS_URL" info stats 2>/dev/null | tr -d '\r' | sed -n 's/^total_commands_processed://p'
}
redis_notes=()
declare -A baseline
for round in $(seq "$ROUNDS"); do
  for case in "${cases[@]}"; do
    IFS='|' read -r label url token extra pid group <<<"$case"
    [ "$pid" = skip ] && continue
    before=0; [ "$pid" != "-" ] && before=$(cpu_ticks "$pid")
    redis_before=""
    [[ "$label" == *Redis* ]] && redis_before=$(redis_commands)
    read -r rps p50 p99 n < <(run "$url" "$token" "$extra")
    if [ -n "$redis_before" ]; then
      redis_after=$(redis_commands)
      redis_notes+=("round $round: $((redis_after - redis_before)) Redis commands for $n requests")
    fi
    cpu="-"
    if [ "$pid" != "-" ]; then
      after=$(cpu_ticks "$pid")
      cpu=$(awk -v t=$((after - before)) -v hz="$tick" -v n="$n" 'BEGIN { printf "%.1f", t / hz * 1e6 / n }')
    fi
    ratio="-"
    IFS=',' read -ra parts <<<"$group"
    for part in "${parts[@]}"; do
      case "$part" in
        =*) baseline[${part#=}]=$rps; [ "$ratio" = "-" ] && ratio="1.00" ;;
        ?*) [ "$ratio" = "-" ] && ratio=$(awk -v a="$rps" -v b="${baseline[$part]:-0}" 'BEGIN { if (b > 0) printf "%.2f", a/b; else printf "-" }') ;;
      esac
    done
    printf '%-5s %-42s %11s %8s %8s %9s %9s\n' "$round" "$label" "$rps" "$p50" "$p99" "$ratio" "$cpu"
  done
done
if [ ${#redis_notes[@]} -gt 0 ]; then
  echo "Redis-shared limits (every command the Redis server processed meanwhile, any client's):"
  printf '  %s\n' "${redis_notes[@]}"
fi

# WebSocket relay: echo messages/s, WS_CONNECTIONS connections with one message in flight
# each, through nginx and through the gateway (HS256 JWT in the query), interleaved.
ws_seconds=${DURATION%s}
echo
echo "websocket echo: $WS_CONNECTIONS connections, one message in flight each, ${ws_seconds} s per run"
printf '%-5s %-42s %11s %9s %13s\n' round proxy "messages/s" "vs nginx" "CPU µs/msg"
for round in $(seq "$ROUNDS"); do
  nginx_ws=""
  for case in "nginx|ws://127.0.0.1:$NGINX/ws/echo|$nginx_pid" \
              "gateway, HS256 JWT|ws://127.0.0.1:$GATEWAY/ws/echo?access_token=$HS_TOKEN|$gateway_pid"; do
    IFS='|' read -r label url pid <<<"$case"
    before=$(cpu_ticks "$pid")
    rate=$("$WS_BENCH" ping-pong "$url" "$WS_CONNECTIONS" "$ws_seconds")
    after=$(cpu_ticks "$pid")
    [ -z "$nginx_ws" ] && nginx_ws=$rate
    ratio=$(awk -v a="$rate" -v b="$nginx_ws" 'BEGIN { printf "%.2f", a/b }')
    cpu=$(awk -v t=$((after - before)) -v hz="$tick" -v n="$rate" -v s="$ws_seconds" 'BEGIN { printf "%.1f", t / hz * 1e6 / (n * s) }')
    printf '%-5s %-42s %11s %9s %13s\n' "$round" "$label" "$rate" "$ratio" "$cpu"
  done
done

# Memory figures come from fresh processes: after the load above, memory the proxies
# freed would be reused by the idle connections and hide their cost.
restart_proxies() {
  for pid in "$nginx_pid" "$haproxy_pid" "$gateway_pid" "$floor_pid" $rl_gateway_pid; do kill "$pid" 2>/dev/null || true; done
  for pid in "$nginx_pid" "$haproxy_pid" "$gateway_pid" "$floor_pid" $rl_gateway_pid; do wait "$pid" 2>/dev/null || true; done
  rl_gateway_pid=""
  start_nginx; start_haproxy; start_gateway; start_floor; wait_ready
}
restart_proxies
# And a hyper server answering by itself, nothing behind it: what an idle kept-alive
# connection costs the stack before any proxying.
"$FLOOR_BENCH" "127.0.0.1:$SERVER_ONLY" - "$(nproc)" >/dev/null 2>&1 &
server_only_pid=$!
pids+=("$server_only_pid")
for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$SERVER_ONLY/" && break; sleep 0.1; done
for warm in "$NGINX/warm" "$HAPROXY/warm" "$FLOOR/warm" "$SERVER_ONLY/warm" "$GATEWAY/public/warm"; do curl -sf -o /dev/null "http://127.0.0.1:$warm"; done

# Idle keep-alive connections: IDLE connections, one request each, then held for HOLD s;
# the proxy's RSS growth per connection, and how many are still open at the end.
hold_idle() {
  python3 - "$1" "$IDLE" "$HOLD" <<'PY'
import socket, sys, time
port, count, hold = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
socks = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /public/idle HTTP/1.1\r\nHost: bench\r\n\r\n")
    socks.append(s)
for s in socks:
    s.settimeout(10)
    s.recv(65536)
time.sleep(0.5)
for s in socks:  # the rest of a response that came in two segments
    s.setblocking(False)
    try:
        s.recv(65536)
    except BlockingIOError:
        pass
print("held", flush=True)
time.sleep(hold)
open_ = 0
for s in socks:
    s.setblocking(False)
    try:
        if s.recv(1) != b"":  # b"": the proxy closed it
            open_ += 1
    except BlockingIOError:
        open_ += 1  # nothing to read: still open
    except OSError:
        pass
print(f"open {open_}", flush=True)
PY
}
echo
echo "idle keep-alive connections: $IDLE, one request each, held ${HOLD} s"
printf '%-28s %14s %18s\n' proxy "KiB per conn" "still open"
for case in "nginx proxy_pass|$NGINX|$nginx_pid" "HAProxy|$HAPROXY|$haproxy_pid" \
            "hyper server alone|$SERVER_ONLY|$server_only_pid" \
            "hyper floor (proxying)|$FLOOR|$floor_pid" "gateway|$GATEWAY|$gateway_pid"; do
  IFS='|' read -r label port pid <<<"$case"
  before=$(rss_kib "$pid")
  exec 3< <(hold_idle "$port")
  read -r _ <&3
  during=$(rss_kib "$pid")
  read -r _ open <&3
  exec 3<&-
  per=$(awk -v a="$during" -v b="$before" -v n="$IDLE" 'BEGIN { printf "%.1f", (a - b) / n }')
  printf '%-28s %14s %18s\n' "$label" "$per" "$open/$IDLE"
done

# Idle WebSockets: IDLE upgraded connections held open (each also holds an upstream
# connection on the proxy); the proxy's RSS growth per WebSocket.
restart_proxies
"$WS_BENCH" ping-pong "ws://127.0.0.1:$NGINX/ws/warm" 2 1 >/dev/null
"$WS_BENCH" ping-pong "ws://127.0.0.1:$GATEWAY/ws/warm?access_token=$HS_TOKEN" 2 1 >/dev/null
echo
echo "idle WebSockets: $IDLE open, held"
printf '%-28s %14s\n' proxy "KiB per socket"
for case in "nginx|ws://127.0.0.1:$NGINX/ws/idle|$nginx_pid" \
            "gateway|ws://127.0.0.1:$GATEWAY/ws/idle?access_token=$HS_TOKEN|$gateway_pid"; do
  IFS='|' read -r label url pid <<<"$case"
  before=$(rss_kib "$pid")
  coproc HOLD_WS { "$WS_BENCH" hold "$url" "$IDLE"; }
  read -r _ <&"${HOLD_WS[0]}"
  during=$(rss_kib "$pid")
  echo done >&"${HOLD_WS[1]}"
  wait "$HOLD_WS_PID" 2>/dev/null || true
  per=$(awk -v a="$during" -v b="$before" -v n="$IDLE" 'BEGIN { printf "%.1f", (a - b) / n }')
  printf '%-28s %14s\n' "$label" "$per"
done
