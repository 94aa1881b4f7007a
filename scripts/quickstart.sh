#!/usr/bin/env bash
# meshgate for real on one machine: a coordinator, a node serving the bundled
# SmolLM2 model through a llama.cpp runner, enrolled over the encrypted tunnel.
#
#   ./scripts/quickstart.sh          run until Ctrl-C, printing examples to paste
#   ./scripts/quickstart.sh --check  send one chat request through each port,
#                                    print both answers, stop, exit 0 if both answered
#
# Ports: MESHGATE_API_PORT (8470), MESHGATE_TUNNEL_PORT (8471), MESHGATE_PROXY_PORT (11438).
set -euo pipefail
cd "$(dirname "$0")/.."
check=0
[ "${1:-}" = "--check" ] && check=1

api_port=${MESHGATE_API_PORT:-8470}
tunnel_port=${MESHGATE_TUNNEL_PORT:-8471}
proxy_port=${MESHGATE_PROXY_PORT:-11438}

echo "== installing meshgate into .venv (llama-cpp-python compiles once, ~5 min)"
./scripts/install.sh
model=$(./scripts/fetch_model.sh)
bin=.venv/bin

# a port another process holds is named here, not found out later as a confusing failure
$bin/python - "$api_port" "$tunnel_port" "$proxy_port" <<'PY' || exit 1
import sys
from meshgate.startup import StartupError, check_port
names = (("coordinator API", "MESHGATE_API_PORT"), ("coordinator tunnel", "MESHGATE_TUNNEL_PORT"),
         ("node proxy", "MESHGATE_PROXY_PORT"))
for port, (what, var) in zip(map(int, sys.argv[1:]), names):
    try:
        check_port("127.0.0.1", port, what=what, option=f"{var}=PORT")
    except StartupError as exc:
        sys.exit(f"quickstart: {exc}")
PY
state=$(mktemp -d -t meshgate-quickstart.XXXXXX)
pids=()
stop() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$state"
}
trap stop EXIT
trap 'exit 130' INT TERM

wait_for() {  # wait_for URL SECONDS [AUTH]
  local deadline=$((SECONDS + $2))
  until $bin/python - "$1" "${3:-}" <<'PY' 2>/dev/null
import sys, urllib.request
req = urllib.request.Request(sys.argv[1])
if sys.argv[2]:
    req.add_header("Authorization", "Bearer " + sys.argv[2])
body = urllib.request.urlopen(req, timeout=2).read().decode()
sys.exit(0 if "smollm2" in body or "ok" in body else 1)
PY
  do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $1" >&2; return 1; }
    sleep 0.5
  done
}

echo "== starting the coordinator (state in $state/coordinator)"
$bin/meshgate-coordinator serve --state-dir "$state/coordinator" --api-host 127.0.0.1 \
  --api-port "$api_port" --tunnel-host 127.0.0.1 --tunnel-port "$tunnel_port" \
  >"$state/coordinator.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$api_port/healthz" 30
token=$($bin/meshgate-coordinator token create --state-dir "$state/coordinator" --ttl 10m --label site=quickstart | tail -n 1)
key=$($bin/meshgate-coordinator key create --state-dir "$state/coordinator" --name quickstart | tail -n 1)

echo "== enrolling a node"
$bin/meshgate-node enroll "$token" --state-dir "$state/node"
$bin/meshgate-node run --state-dir "$state/node" --proxy-port "$proxy_port" \
  --model "smollm2=$model" >"$state/node.log" 2>&1 &
pids+=($!)
wait_for "http://127.0.0.1:$proxy_port/v1/models" 120
wait_for "http://127.0.0.1:$api_port/v1/models" 30 "$key"

if [ $check -eq 1 ]; then
  status=0
  for target in "node proxy|http://127.0.0.1:$proxy_port/v1|local" "coordinator|http://127.0.0.1:$api_port/v1|$key"; do
    IFS='|' read -r name url auth <<<"$target"
    answer=$($bin/python - "$url" "$auth" <<'PY'
import json, sys, urllib.request
body = json.dumps({"model": "smollm2", "max_tokens": 24,
                   "messages": [{"role": "user", "content": "Say hello in five words."}]}).encode()
req = urllib.request.Request(sys.argv[1] + "/chat/completions", data=body,
                             headers={"Content-Type": "application/json",
                                      "Authorization": "Bearer " + sys.argv[2]})
reply = json.load(urllib.request.urlopen(req, timeout=120))
text = reply["choices"][0]["message"]["content"]
assert text.strip(), "empty answer"
print(text.strip().replace("\n", " "), "| usage:", json.dumps(reply["usage"]))
PY
) && echo "$name answered: $answer" || { echo "$name did NOT answer" >&2; status=1; }
  done
  [ $status -eq 0 ] && echo "quickstart check passed" || { echo "--- logs"; tail -n 30 "$state"/*.log; }
  exit $status
fi

cat <<EOF_EXAMPLES

meshgate is running. State and logs: $state

# Through the coordinator (any client, with the API key):
curl -s http://127.0.0.1:$api_port/v1/chat/completions \\
  -H "Authorization: Bearer $key" -H "Content-Type: application/json" \\
  -d '{"model": "smollm2", "messages": [{"role": "user", "content": "Hello!"}]}'

# Straight to the node's local proxy (apps on this box, no key needed):
curl -s http://127.0.0.1:$proxy_port/v1/chat/completions -H "Content-Type: application/json" \\
  -d '{"model": "smollm2", "stream": true, "messages": [{"role": "user", "content": "Hello!"}]}'

# OpenAI SDK (pip install openai):
python3 - <<'PY'
from openai import OpenAI
for base, key in [("http://127.0.0.1:$api_port/v1", "$key"), ("http://127.0.0.1:$proxy_port/v1", "local")]:
    client = OpenAI(base_url=base, api_key=key)
    reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Hi"}])
    print(base, "->", reply.choices[0].message.content)
PY

Press Ctrl-C to stop both.
EOF_EXAMPLES
wait "${pids[0]}"
