#!/usr/bin/env bash
# The system tools the tests use, installed from Debian/Ubuntu packages if any is missing.
# `make test` (and so .ci/run) runs this before anything else; it is quiet when all is there.
#   prometheus, promtool  the real Prometheus the metrics tests scrape with (prometheus)
#   docker-compose        validates docker-compose.yml without a Docker engine
#   libb64.so.0d          perf_analyzer (bundled with tritonclient 2.51) links it
#   curl                  the README's "use it" commands
#   openssl               makes the certificates of the TLS tests
#   chromium, chromedriver  the web page's real-browser test (chromium, chromium-driver)
# As root it runs apt-get; otherwise sudo (without a password prompt, unless a terminal can
# ask); otherwise it says what to install and fails.
set -euo pipefail

missing=()
need_command() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need_command prometheus prometheus
need_command promtool prometheus
need_command docker-compose docker-compose
need_command curl curl
need_command openssl openssl
need_command chromium chromium
need_command chromedriver chromium-driver
if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; then
    missing+=(libb64-0d)
fi
[ ${#missing[@]} -eq 0 ] && exit 0

# One package may be missing for two reasons (prometheus, promtool): name it once.
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "setup-system: installing Debian packages the tests need: ${packages[*]}"
if [ "$(id -u)" -eq 0 ]; then
    as_root=()
elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
    as_root=(sudo)
else
    echo "setup-system: cannot install ${packages[*]}: not root and no usable sudo." >&2
    echo "  Install them yourself, then run make test again:" >&2
    echo "  apt-get update && apt-get install -y --no-install-recommends ${packages[*]}" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "setup-system: no apt-get here: install ${packages[*]} with this system's" \
        "package manager, then run make test again" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"
