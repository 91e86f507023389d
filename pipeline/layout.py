"""File names of the output contract (README "Output contract"), in one place.

Flashers, factory CI and auditors read these names; every module that writes or reads a
batch takes them from here.
"""

from __future__ import annotations

# <output>/<batch-id>/
JOURNAL = "journal.sqlite"
LOCK = ".lock"
SIGNING_LEDGER = ".signing.ledger"  # serials that may have reached a signer (batch/ledger.py)
SPACE_RESERVE = ".space-reserve"  # room kept for a run's last words when the disk fills
AUDIT_LOG = "audit.jsonl"
AUDIT_SEAL = "audit.jsonl.p7s"
REPORT = "report.json"
REPORT_TEXT = "report.txt"

# <output>/<batch-id>/<registration-id>/
DEVICE_JSON = "device.json"  # written last: its presence means the bundle is complete
DEVICE_CERT = "device.cert.pem"
FULL_CHAIN = "full-chain.cert.pem"
WRAPPED_KEY = "device.key.wrapped"
PKCS8_KEY = "device.key.pem"
PKCS12 = "device.pfx"

TEMP_SUFFIX = ".tmp"  # atomic writes go through ".<name>.tmp" in the same directory

# <output>/.lifecycle/ by default (station setting ``lifecycle``; docs/lifecycle.md): the
# station's life after the factory. A batch id never starts with a dot, so it cannot clash.
LIFECYCLE_DIR = ".lifecycle"
INVENTORY = "inventory.sqlite"  # every certificate the station issued, indexed
CRL_DIR = "crl"  # <issuer key id>.crl.pem: the cumulative CRL of each issuing CA
RENEWALS_DIR = "renewals"  # <operation id>/<registration-id>/: bundles of renewed devices
# the lifecycle log is AUDIT_LOG + AUDIT_SEAL in the lifecycle directory, locked by LOCK

# Flasher formats made from a sealed batch (`provline export`, docs/key-delivery.md). The name
# is upper-case so that it can never be a registration ID (those are lower-case), and it holds
# no device.json of its own: the batch's audit log never covers it.
EXPORTS = "EXPORTS"
EXPORT_DEVICES = "devices"  # EXPORTS/devices/<registration-id>/...
EXPORT_ARCHIVES = "archives"  # EXPORTS/archives/<registration-id>.tar.gz
EXPORT_INDEX_CSV = "index.csv"
EXPORT_INDEX_JSON = "index.json"

# A programming fixture's directory (`provline fixture ...`); its log is AUDIT_LOG + AUDIT_SEAL.
FIXTURE_JSON = "fixture.json"
FIXTURE_REQUEST = "request.pem"
FIXTURE_LOG_CERT = "log.cert.pem"  # the fixture log key's certificate, then its issuers
FIXTURE_TRANSPORT_DIR = "transport"  # one <check value>.json per transport key it holds
