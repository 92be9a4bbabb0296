# The two commands of the README: `make run` (the demo on embedded defaults) and `make test`.
# Each installs what it needs first, so both work on a fresh machine.
export UV_PYTHON_DOWNLOADS := never
# uv is called as a module of the machine's python3 so that no PATH set-up is needed.
UV := python3 -m uv

.PHONY: install install-browser run test lint bench

install:
	@python3 -m uv --version >/dev/null 2>&1 || python3 -m pip install --quiet uv \
	  || python3 -m pip install --quiet --user --break-system-packages uv
	$(UV) sync --frozen

# The browser tests drive Debian's Chromium; a browser cannot be downloaded at test time.
install-browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium; }

run: install
	$(UV) run python manage.py demo

test: install install-browser
	$(UV) run pytest

lint: install
	$(UV) run ruff check .
