# provline: `make demo` and `make test` do their own set-up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROVLINE := $(VENV)/bin/provline
STAMP := $(VENV)/.installed

DEMO := demo
DEMO_BATCH ?= demo-$(shell date -u +%Y%m%d-%H%M%S)
# Where the emulator listens (docs/emulator.md). As root: DPS and IoT Hub on the standard ports
# (443, 8883) of two private loopback addresses, as Microsoft's device SDKs need; otherwise
# free ports on 127.0.0.1 (provline's own clients work either way).
EMULATOR_ARGS ?= $(if $(filter 0,$(shell id -u)),--host 127.77.0.1 --hub-host 127.77.0.2 --standard-ports)

.PHONY: setup tools demo demo-ca test test-fast bench lint audit-verify emulator clean clean-demo

setup: tools $(STAMP)

# SoftHSM2 (softhsm2-util, the module), OpenSC (pkcs11-tool), the openssl and curl CLIs,
# OpenSSL's PKCS#11 engine (device checks of retained keys), and openCryptoki (pkcsslotd,
# pkcsconf, its software token: the second PKCS#11 implementation the tests run on), and a C
# compiler (the tests compile the C header `provline export` makes).
tools:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v pkcs11-tool >/dev/null || missing="$$missing opensc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
	command -v curl >/dev/null || missing="$$missing curl"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	ls /usr/lib/*/engines-3/pkcs11.so >/dev/null 2>&1 || missing="$$missing libengine-pkcs11-openssl"; \
	[ -x /usr/sbin/pkcsslotd ] || missing="$$missing opencryptoki"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else \
	    echo "error: missing$$missing; run: sudo apt-get install -y$$missing" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The demo CA: two SoftHSM2 tokens under demo/ (offline root, station), random PINs in
# demo/secrets (0600), root -> intermediate, transport key, audit key. Made once.
demo-ca: setup
	@if [ ! -f $(DEMO)/ca/chain.pem ]; then \
	  set -e; rm -rf $(DEMO); mkdir -p $(DEMO)/secrets; chmod 700 $(DEMO)/secrets; \
	  umask 077; for s in pin so-pin root-pin pkcs8-pass; do $(PY) -c 'import secrets; print(secrets.token_hex(8))' > $(DEMO)/secrets/$$s; done; \
	  export SOFTHSM2_CONF=$$PWD/$(DEMO)/hsm/softhsm2.conf; \
	  $(PROVLINE) hsm init $(DEMO)/hsm --label demo-root --pin-source file:$(DEMO)/secrets/root-pin --so-pin-source file:$(DEMO)/secrets/so-pin; \
	  $(PROVLINE) hsm init $(DEMO)/hsm --label demo-station --pin-source file:$(DEMO)/secrets/pin --so-pin-source file:$(DEMO)/secrets/so-pin; \
	  $(PROVLINE) ca init-root --out $(DEMO)/ca --token demo-root --pin-source file:$(DEMO)/secrets/root-pin --subject "CN=provline Demo Root CA,O=provline demo"; \
	  $(PROVLINE) ca init-intermediate --out $(DEMO)/ca --root-cert $(DEMO)/ca/root.cert.pem \
	    --root-key "pkcs11:token=demo-root;object=root;type=private?pin-source=file:$(DEMO)/secrets/root-pin" \
	    --token demo-station --pin-source file:$(DEMO)/secrets/pin --subject "CN=provline Demo Issuing CA,O=provline demo"; \
	  $(PROVLINE) ca transport-key --token demo-station --pin-source file:$(DEMO)/secrets/pin; \
	  $(PROVLINE) ca audit-key --out $(DEMO)/ca --issuer-cert $(DEMO)/ca/intermediate.cert.pem \
	    --issuer-key "pkcs11:token=demo-station;object=intermediate;type=private" \
	    --token demo-station --pin-source file:$(DEMO)/secrets/pin; \
	fi

# The whole line: emulator in the background, the demo batch (wrapped custody, individual DPS
# enrollments, CA uploaded and proven), a 3-device dev-kit batch (pkcs8 custody, enrollment
# group) whose devices then register over mTLS and send telemetry, offline audit checks.
# Each demo starts a fresh emulator (demo/emulator is reset): the demo reuses registration IDs.
demo: demo-ca
	@set -e; rm -rf $(DEMO)/emulator; mkdir -p $(DEMO)/emulator; \
	$(PROVLINE) emulator serve --data-dir $(DEMO)/emulator $(EMULATOR_ARGS) > $(DEMO)/emulator.log 2>&1 & pid=$$!; \
	trap 'kill $$pid 2>/dev/null; wait $$pid 2>/dev/null || true' EXIT; \
	for i in $$(seq 100); do [ -f $(DEMO)/emulator/emulator.json ] && break; sleep 0.1; done; \
	[ -f $(DEMO)/emulator/emulator.json ] || { cat $(DEMO)/emulator.log; exit 1; }; \
	echo "== emulator up (pid $$pid): $(DEMO)/emulator/emulator.json"; \
	echo "== demo batch $(DEMO_BATCH): wrapped custody, individual enrollments"; \
	$(PROVLINE) run manifests/demo.yaml --station stations/demo.yaml --batch-id $(DEMO_BATCH) --upload-ca; \
	echo "== dev-kit batch devkit-$(DEMO_BATCH): pkcs8 custody, enrollment group, device check"; \
	$(PROVLINE) run manifests/devkit.yaml --station stations/demo-devkit.yaml --batch-id devkit-$(DEMO_BATCH) --smoke 3; \
	echo "== offline audit verification"; \
	$(PROVLINE) audit verify $(DEMO)/out/$(DEMO_BATCH) --root $(DEMO)/ca/root.cert.pem | head -3; \
	$(PROVLINE) audit verify $(DEMO)/out/devkit-$(DEMO_BATCH) --root $(DEMO)/ca/root.cert.pem | head -1; \
	echo; echo "bundles:   $(DEMO)/out/$(DEMO_BATCH)/<registration-id>/"; \
	echo "audit log: $(DEMO)/out/$(DEMO_BATCH)/audit.jsonl (+ .p7s), report: report.json"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench.py

# ruff (lint and format) and mypy (strict, over pipeline/); any finding fails.
lint: setup
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/ruff format --check pipeline tests benchmarks
	$(VENV)/bin/mypy

# The fast layer: pure logic, no HSM, no server, no subprocess (seconds).
test-fast: setup
	$(PY) -m pytest -q -m "not integration"

# The local DPS + IoT Hub emulator in the foreground (docs/emulator.md).
emulator: setup
	$(PROVLINE) emulator serve --data-dir $(DEMO)/emulator $(EMULATOR_ARGS)

audit-verify: setup
	@test -n "$(BATCH)" || { echo "usage: make audit-verify BATCH=path/to/batch [ROOT=root.cert.pem]" >&2; exit 2; }
	$(PROVLINE) audit verify $(BATCH) $(if $(ROOT),--root $(ROOT))

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-results.json
