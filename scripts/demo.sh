#!/usr/bin/env bash
# The main job, end to end: start vlm-server on the tiny checkpoint that ships
# with the repo, send it the exact request nv-ingest sends to caption an image,
# print the answer, and stop the server.
set -euo pipefail
cd "$(dirname "$0")/.."

port="${PORT:-8000}"
image="${1:-server/tests/golden/images/wide_200x100.png}"

cargo build --release -p vlm-server
target/release/vlm-server serve server/assets/tiny --host 127.0.0.1 --port "$port" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null' EXIT

for _ in $(seq 1 300); do
  curl -sf "http://127.0.0.1:$port/v1/health/ready" >/dev/null && break
  sleep 0.2
done

# nv-ingest's request body (see docs: nv-ingest contract), one PNG per request.
body=$(mktemp)
{
  printf '{"model":"nvidia/nemotron-nano-12b-v2-vl","messages":['
  printf '{"role":"system","content":"/no_think"},'
  printf '{"role":"user","content":[{"type":"text","text":"Caption the content of this image:"},'
  printf '{"type":"image_url","image_url":{"url":"data:image/png;base64,'
  base64 -w0 "$image"
  printf '"}}]}],"max_tokens":64,"temperature":1.0,"top_p":1.0,"stream":false}'
} >"$body"

curl -sS "http://127.0.0.1:$port/v1/chat/completions" \
  -H 'content-type: application/json' -H 'Authorization: Bearer ngcapikey' \
  --data-binary @"$body"
echo
rm -f "$body"
