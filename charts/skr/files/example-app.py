# The example app: waits until its skr sidecar is ready, releases one key over loopback, reports what it
# got (type and permitted operations — never the key itself), then keeps the key in memory and idles.
# Standard library only, so it runs in the skr image; a real app does the same with its own HTTP client.
import json
import os
import sys
import time
import urllib.request as u

opener = u.build_opener(u.ProxyHandler({}))  # loopback: never through an HTTP(S)_PROXY
base = os.environ["SKR_URL"]
headers = {"Content-Type": "application/json"}
token_file = os.environ.get("SKR_CLIENT_TOKEN_FILE")
if token_file:
    with open(token_file, encoding="utf-8") as f:
        headers["Authorization"] = "Bearer " + f.read().strip()

while True:
    try:
        opener.open(base + "/readyz", timeout=3).close()
        break
    except OSError as exc:
        print("waiting for skr:", exc, flush=True)
        time.sleep(3)

body = json.dumps({"kid": os.environ["SKR_KID"]}).encode()
try:
    request = u.Request(base + "/key/release", data=body, headers=headers)  # noqa: S310 - the chart's http URL
    with opener.open(request, timeout=60) as r:
        answer = json.load(r)
except u.HTTPError as exc:
    error = json.load(exc)
    print("release refused:", exc.code, error.get("code"), error.get("error"), flush=True)
    sys.exit(1)

key = json.loads(answer["key"])  # the JWK arrives as a JSON string, as with the Go sidecar
print("released a", key["kty"], "key, key_ops", key.get("key_ops"), flush=True)
while True:
    time.sleep(3600)
