# provline: `make demo` and `make test` do their own set-up on a fresh Debian machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROVLINE := $(VENV)/bin/provline
STAMP := $(VENV)/.installed
APT_PACKAGES := softhsm2 opensc openssl

DEMO := demo
DEMO_BATCH ?= demo-$(shell date -u +%Y%m%d-%H%M%S)

.PHONY: setup tools demo demo-ca test bench lint audit-verify emulator clean clean-demo

setup: tools $(STAMP)

# SoftHSM2 (softhsm2-util, the module), OpenSC (pkcs11-tool) and the openssl CLI.
tools:
	@missing=""; \
	command -v softhsm2-util >/dev/null || missing="$$missing softhsm2"; \
	command -v pkcs11-tool >/dev/null || missing="$$missing opensc"; \
	command -v openssl >/dev/null || missing="$$missing openssl"; \
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
	  umask 077; for s in pin so-pin root-pin; do $(PY) -c 'import secrets; print(secrets.token_hex(8))' > $(DEMO)/secrets/$$s; done; \
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

demo: demo-ca
	$(PROVLINE) run manifests/demo.yaml --station stations/demo.yaml --batch-id $(DEMO_BATCH)
	@echo; echo "bundles and audit log: $(DEMO)/out/$(DEMO_BATCH)/"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench.py

lint: setup
	$(VENV)/bin/ruff check pipeline tests benchmarks
	$(VENV)/bin/ruff format --check pipeline tests benchmarks || true

# The local DPS + IoT Hub emulator in the foreground (docs/emulator.md).
emulator: setup
	$(PROVLINE) emulator serve --data-dir $(DEMO)/emulator

audit-verify: setup
	@test -n "$(BATCH)" || { echo "usage: make audit-verify BATCH=path/to/batch [ROOT=root.cert.pem]" >&2; exit 2; }
	$(PROVLINE) audit verify $(BATCH) $(if $(ROOT),--root $(ROOT))

clean-demo:
	rm -rf $(DEMO)

clean: clean-demo
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-results.json
