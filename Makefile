# The two commands of the README: `make run` (the demo on embedded defaults) and `make test`.
# Each installs what it needs first, so both work on a fresh machine. `make run` gets the
# runtime packages only (no dev group: pytest, vollib, playwright...); `make test` adds them.
export UV_PYTHON_DOWNLOADS := never
# uv is called as a module of the machine's python3 so that no PATH set-up is needed.
UV := python3 -m uv

.PHONY: uv install install-dev install-js install-browser screenshots install-promtool run test lint bench release prod-local faults faults-quick

uv:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
	  || python3 -m pip install --quiet --user --break-system-packages uv

# Exactly the runtime packages of uv.lock: dev-only packages are removed if present.
install: uv install-js
	$(UV) sync --frozen --no-dev

install-dev: uv install-js
	$(UV) sync --frozen

# The chain page's charting library (Apache ECharts, package.json + package-lock.json), served
# as static files from node_modules (tickerproj/static_vendor.py); npm ci with the machine's
# Node and npm, no install scripts, done again only when package.json or the lock changes.
install-js: node_modules/.installed
node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --ignore-scripts
	@touch $@

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

# --no-sync: `uv run` would otherwise install the dev group again.
run: install
	$(UV) run --no-sync python manage.py demo

# Before the first start and after every upgrade: schema, periodic jobs, static files.
release: install
	$(UV) run --no-sync python manage.py migrate --noinput
	$(UV) run --no-sync python manage.py ensure_schedules
	$(UV) run --no-sync python manage.py collectstatic --noinput

# The production layout of the Procfile on this machine, on the environment of .env.
prod-local:
	@test -f .env || { echo "make prod-local reads .env: cp .env.example .env and fill it in (docs/deploy.md)" >&2; exit 1; }
	$(MAKE) release
	$(UV) run --no-sync honcho start

# docs/chain-page.png and docs/chain-charts.png from the demo in headless Chromium (about 5 min:
# it waits for a few 1-minute bars).
screenshots: install-dev install-browser
	$(UV) run --no-sync python docs/screenshots.py

# In parallel on pytest-xdist workers (docs/testing.md): the suite waits on real processes far
# more than it computes, so more workers than cores pay. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 4
test: install-dev install-browser install-promtool
	$(UV) run --no-sync pytest -n $(TEST_WORKERS) --dist loadgroup

# The fault-injection and security suite against the whole deployment on private PostgreSQL
# and Redis (docs/reliability.md; about 35 min): every scenario, rewrites docs/reliability.md,
# exits 1 if any promise broke. Runs as root (initdb runs as the postgres OS user).
faults: install-dev
	$(UV) run --no-sync python -m faults --write-doc

# Its CI subset (under 5 min); tests/test_faults_quick.py runs the same under `make test`.
faults-quick: install-dev
	$(UV) run --no-sync python -m faults --quick

lint: install-dev
	$(UV) run --no-sync ruff check .
