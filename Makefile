# The two commands of the README: `make run` (the demo on embedded defaults) and `make test`.
# Each installs what it needs first, so both work on a fresh machine. `make run` gets the
# runtime packages only (no dev group: pytest, vollib, playwright...); `make test` adds them.
export UV_PYTHON_DOWNLOADS := never
# uv is called as a module of the machine's python3 so that no PATH set-up is needed.
UV := python3 -m uv

.PHONY: uv install install-dev install-browser run test lint bench

uv:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
	  || python3 -m pip install --quiet --user --break-system-packages uv

# Exactly the runtime packages of uv.lock: dev-only packages are removed if present.
install: uv
	$(UV) sync --frozen --no-dev

install-dev: uv
	$(UV) sync --frozen

# The browser tests drive Debian's Chromium; a browser cannot be downloaded at test time.
install-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

# --no-sync: `uv run` would otherwise install the dev group again.
run: install
	$(UV) run --no-sync python manage.py demo

test: install-dev install-browser
	$(UV) run --no-sync pytest

lint: install-dev
	$(UV) run --no-sync ruff check .
