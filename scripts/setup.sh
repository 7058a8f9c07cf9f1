# Sourced by scripts/demo and scripts/test: everything CityGrid needs on a fresh Debian machine.
# Installs Debian packages with apt-get when run as root; otherwise says exactly what to install.

citygrid_apt_install() {
  # $@: Debian packages that are missing
  [ $# -eq 0 ] && return 0
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "==> installing Debian packages: $*"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || {
      apt-get update -q >/dev/null
      apt-get install -y -q --no-install-recommends "$@" >/dev/null
    }
  else
    echo "!!! missing: $*  — install them with: sudo apt-get install -y $*" >&2
    return 1
  fi
}

citygrid_has() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

citygrid_setup() {
  # $1: "services" to also install Mosquitto and InfluxDB; "test" adds Debian's chromium
  # (the status page's browser tests drive it; no browser is ever downloaded); "demo" only
  # tries Mosquitto (the demo stores in SQLite and has a broker of its own to fall back on)
  local missing=()
  if ! python3 -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null; then
    echo "!!! CityGrid needs Python 3.11 or newer as python3" >&2
    return 1
  fi
  if [ ! -x .venv/bin/python ]; then
    if ! python3 -m venv .venv >/dev/null 2>&1; then
      rm -rf .venv
      citygrid_apt_install python3-venv
      python3 -m venv .venv
    fi
  fi
  case "${1:-}" in
    services|test)
      citygrid_has mosquitto || missing+=(mosquitto)
      citygrid_has mosquitto_pub || missing+=(mosquitto-clients)
      citygrid_has influxd || missing+=(influxdb)
      if [ "$1" = test ]; then
        citygrid_has chromium || missing+=(chromium)
        # the alert-routing tests run a real Alertmanager (README: Alerts through Alertmanager)
        citygrid_has prometheus-alertmanager || missing+=(prometheus-alertmanager)
        # the broker-cluster tests run a 3-node NATS cluster (docs/scale-out.md)
        citygrid_has nats-server || missing+=(nats-server)
      fi
      citygrid_apt_install "${missing[@]}" || [ "${CI:-}" != true ] || return 1
      ;;
    demo)  # Mosquitto if it can be had; otherwise `citygrid up` runs its embedded broker
      citygrid_has mosquitto || missing+=(mosquitto)
      citygrid_has mosquitto_pub || missing+=(mosquitto-clients)
      citygrid_apt_install "${missing[@]}" 2>/dev/null \
        || echo "==> no Mosquitto: the demo runs the embedded broker (MQTT 3.1.1)"
      ;;
  esac
  echo "==> installing CityGrid and its Python dependencies into .venv"
  if [ "${1:-}" = demo ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e .
  else
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
  fi
}
