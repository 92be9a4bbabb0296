# The two commands of the README: `make run` (the demo on embedded defaults) and `make test`.
# Each installs what it needs first, so both work on a fresh machine.
export UV_PYTHON_DOWNLOADS := never
# uv is called as a module of the machine's python3 so that no PATH set-up is needed.
UV := python3 -m uv

.PHONY: install install-browser install-promtool run test lint bench release prod-local

install:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
	  || python3 -m pip install --quiet --user --break-system-packages uv
	$(UV) sync --frozen

# The browser tests drive Debian's Chromium; a browser cannot be downloaded at test time.
install-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# promtool checks deploy/prometheus/alerts.yml in the tests. It comes from Debian's prometheus
# package, unpacked into var/tools rather than installed: installing it would start a Prometheus.
PROMTOOL := var/tools/promtool
install-promtool:
	@test -x $(PROMTOOL) || { \
	  set -e; tmp=$$(mktemp -d); cd $$tmp; \
	  apt-get download prometheus >/dev/null 2>&1 || { \
	    if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	    $$SUDO apt-get update -qq && apt-get download prometheus; }; \
	  dpkg-deb -x prometheus_*.deb root; cd - >/dev/null; mkdir -p var/tools; \
	  cp $$tmp/root/usr/bin/promtool $(PROMTOOL); rm -rf $$tmp; }

run: install
	$(UV) run python manage.py demo

# Before the first start and after every upgrade: schema, periodic jobs, static files.
release: install
	$(UV) run python manage.py migrate --noinput
	$(UV) run python manage.py ensure_schedules
	$(UV) run python manage.py collectstatic --noinput

# The production layout of the Procfile on this machine, on the environment of .env.
prod-local:
	@test -f .env || { echo "make prod-local reads .env: cp .env.example .env and fill it in (docs/deploy.md)" >&2; exit 1; }
	$(MAKE) release
	$(UV) run honcho start

test: install install-browser install-promtool
	$(UV) run pytest

lint: install
	$(UV) run ruff check .
