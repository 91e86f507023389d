# provline: `make demo` and `make test` do their own set-up on a fresh Debian machine.
# `make help` lists the targets.
#
# Exit codes: make exits 2 whenever a recipe fails, whatever the command's own code was
# (README "Exit codes"). The targets that run provline, pytest or the linters therefore print
# "exit code N" when N is not 0 and write N to $(EXIT_FILE) either way, so CI can act on the
# real code: `make audit-verify BATCH=... || exit "$(cat .make-exit-code)"`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROVLINE := $(VENV)/bin/provline
STAMP := $(VENV)/.installed

DEMO := demo
# Expanded once, so every step of a demo names the same batch.
ifndef DEMO_BATCH
DEMO_BATCH := demo-$(shell date -u +%Y%m%d-%H%M%S)
endif
# Where the emulator listens (docs/emulator.md). As root: DPS and IoT Hub on the standard ports
# (443, 8883) of two private loopback addresses, as Microsoft's device SDKs need; otherwise
# free ports on 127.0.0.1 (provline's own clients work either way).
EMULATOR_ARGS ?= $(if $(filter 0,$(shell id -u)),--host 127.77.0.1 --hub-host 127.77.0.2 --standard-ports)
EXIT_FILE ?= .make-exit-code

# Prefix of a recipe whose exit code CI needs: on exit, the shell writes its code to
# $(EXIT_FILE) and says it when it is not 0.
KEEP_CODE = trap 'code=$$?; echo $$code > $(EXIT_FILE); [ $$code -eq 0 ] || echo "make $@: exit code $$code (README Exit codes; also in $(EXIT_FILE))" >&2' EXIT;

.PHONY: help setup tools demo demo-ca test test-fast bench lint audit-verify emulator clean clean-demo

help: ## List the targets (this)
	@echo "provline make targets (README; CI contract: docs/ci.md):"
	@awk 'BEGIN {FS = ":[^#]*## "} /^[a-z][a-z-]*:.*## / {printf "  make %-14s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "variables: DEMO_BATCH (demo batch id), BATCH and ROOT (audit-verify), BENCH_QUICK=1 (bench),"
	@echo "           EXIT_FILE (where failing targets write the real exit code; default $(EXIT_FILE))"
	@echo "make exits 2 on any failure; the real code is printed and written to $(EXIT_FILE)."

setup: tools $(STAMP) ## Virtualenv, Python packages, SoftHSM2 and the other Debian tools

# SoftHSM2 (softhsm2-util, the module), OpenSC (pkcs11-tool), the openssl and curl CLIs,
# OpenSSL's PKCS#11 engine (device checks of retained keys), and openCryptoki (pkcsslotd,
# pkcsconf, its software token: the second PKCS#11 implementation the tests run on), and a C
# compiler (the tests compile the C header `provline export` makes).
tools: ## Only the Debian tools (apt-get when missing)
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
demo-ca: setup ## The demo CA under demo/ (two SoftHSM2 tokens, root, issuing CA, keys), once
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
# Any failing step fails the demo (set -e, pipefail) with that step's exit code.
demo: demo-ca ## The whole line on the embedded defaults (emulator, two batches, device checks, audit)
	@set -eo pipefail; rm -rf $(DEMO)/emulator; mkdir -p $(DEMO)/emulator; \
	$(PROVLINE) emulator serve --data-dir $(DEMO)/emulator $(EMULATOR_ARGS) > $(DEMO)/emulator.log 2>&1 & pid=$$!; \
	trap 'code=$$?; kill $$pid 2>/dev/null; wait $$pid 2>/dev/null; echo $$code > $(EXIT_FILE); [ $$code -eq 0 ] || echo "make demo: exit code $$code (README Exit codes; also in $(EXIT_FILE))" >&2' EXIT; \
	for i in $$(seq 100); do [ -f $(DEMO)/emulator/emulator.json ] && break; sleep 0.1; done; \
	[ -f $(DEMO)/emulator/emulator.json ] || { cat $(DEMO)/emulator.log; exit 1; }; \
	echo "== emulator up (pid $$pid): $(DEMO)/emulator/emulator.json"; \
	echo "== demo batch $(DEMO_BATCH): wrapped custody, individual enrollments"; \
	$(PROVLINE) plan manifests/demo.yaml --station stations/demo.yaml --batch-id $(DEMO_BATCH) --upload-ca > $(DEMO)/plan.txt; \
	tail -n 4 $(DEMO)/plan.txt; \
	$(PROVLINE) run manifests/demo.yaml --station stations/demo.yaml --batch-id $(DEMO_BATCH) --upload-ca --operator "$${PROVLINE_OPERATOR:-$${USER:-demo}}"; \
	echo "== dev-kit batch devkit-$(DEMO_BATCH): pkcs8 custody, enrollment group, device check"; \
	$(PROVLINE) run manifests/devkit.yaml --station stations/demo-devkit.yaml --batch-id devkit-$(DEMO_BATCH) --smoke 3 --operator "$${PROVLINE_OPERATOR:-$${USER:-demo}}"; \
	echo "== offline audit verification (anchored to the demo root)"; \
	$(PROVLINE) audit verify $(DEMO)/out/$(DEMO_BATCH) --root $(DEMO)/ca/root.cert.pem > $(DEMO)/verify.txt; \
	$(PROVLINE) audit verify $(DEMO)/out/devkit-$(DEMO_BATCH) --root $(DEMO)/ca/root.cert.pem >> $(DEMO)/verify.txt; \
	grep "audit log VERIFIED" $(DEMO)/verify.txt; \
	echo "== what happened in the demo batch (provline audit show)"; \
	$(PROVLINE) audit show $(DEMO)/out/$(DEMO_BATCH) --root $(DEMO)/ca/root.cert.pem; \
	echo; echo "bundles:   $(DEMO)/out/$(DEMO_BATCH)/<registration-id>/"; \
	echo "audit log: $(DEMO)/out/$(DEMO_BATCH)/audit.jsonl (+ .p7s), report: report.json (full checks: $(DEMO)/verify.txt)"

test: setup ## The whole test suite (real SoftHSM2 tokens, TLS, openssl, curl)
	@$(KEEP_CODE) $(PY) -m pytest -q

# Benchmarks write bench-results.json and bench-report.md (both untracked), never a tracked
# file; BENCH_QUICK=1 runs every figure at a small size (docs/benchmarks.md).
bench: setup ## Benchmarks (BENCH_QUICK=1: every figure at a small size)
	@$(KEEP_CODE) $(PY) benchmarks/bench.py

# ruff (lint and format) and mypy (strict, over pipeline/); any finding fails.
lint: setup ## ruff check, ruff format --check, strict mypy
	@$(KEEP_CODE) set -e; $(VENV)/bin/ruff check pipeline tests benchmarks; \
	$(VENV)/bin/ruff format --check pipeline tests benchmarks; \
	$(VENV)/bin/mypy

# The fast layer: pure logic, no HSM, no server, no subprocess (seconds).
test-fast: setup ## The unit layer only (no HSM, no server): seconds
	@$(KEEP_CODE) $(PY) -m pytest -q -m "not integration"

# The local DPS + IoT Hub emulator in the foreground (docs/emulator.md).
emulator: setup ## The local DPS + IoT Hub emulator in the foreground
	$(PROVLINE) emulator serve --data-dir $(DEMO)/emulator $(EMULATOR_ARGS)

# Without ROOT the log is checked against the root it names itself: UNANCHORED, exit 61.
audit-verify: setup ## Verify a batch's audit log offline: BATCH=dir [ROOT=root.cert.pem]
	@$(KEEP_CODE) test -n "$(BATCH)" || { echo "usage: make audit-verify BATCH=path/to/batch [ROOT=root.cert.pem]" >&2; exit 2; }; \
	$(PROVLINE) audit verify $(BATCH) $(if $(ROOT),--root $(ROOT))

clean-demo: ## Remove demo/
	rm -rf $(DEMO)

clean: clean-demo ## Remove demo/, the virtualenv, caches, benchmark results
	rm -rf $(VENV) .pytest_cache .ruff_cache bench-results.json bench-report.md $(EXIT_FILE)
