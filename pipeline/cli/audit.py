"""``provline audit verify``: the auditor's offline check of a sealed batch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..audit.fixture_verify import is_delivery_log, verify_delivery_log
from ..audit.lifecycle_verify import LifecycleSummary, is_lifecycle_log, verify_lifecycle
from ..audit.verify import verify_batch
from ..ca.certs import load_cert
from .app import JsonOpt, audit_app


@audit_app.command("verify")
def audit_verify_cmd(
    batch_dir: Annotated[
        Path,
        typer.Argument(
            help="A batch directory, a station lifecycle directory, a fixture directory or a "
            "ceremony log directory."
        ),
    ],
    root: Annotated[
        Path | None,
        typer.Option("--root", help="Trusted root certificate (default: the root the log names)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the signature, the signer chain, the hash chain, every bundle file, every serial
    and report.json, offline. A fixture's or a station's key-delivery log (its first line is
    log_start) gets the signature, chain and delivery checks. Exit 6 naming the first bad
    line or file."""
    anchor = load_cert(str(root), where="--root") if root else None
    if is_lifecycle_log(batch_dir):  # a station lifecycle directory (docs/lifecycle.md)
        _print_lifecycle(verify_lifecycle(batch_dir, anchor), root, as_json)
        return
    if is_delivery_log(batch_dir):  # a fixture's or a station's ceremony log
        log = verify_delivery_log(batch_dir, anchor)
        if as_json:
            print(json.dumps({"verified": True, **log.as_dict()}, indent=2))
        else:
            print("\n".join(log.lines_for_terminal(root)))
        return
    summary = verify_batch(batch_dir, anchor)
    if as_json:
        print(
            json.dumps(
                {
                    "verified": True,
                    "trust_anchor": str(root) if root else "from log",
                    **summary.as_dict(),
                },
                indent=2,
            )
        )
        return
    print(f"batch {summary.batch_id} (station {summary.station}): audit log VERIFIED")
    print(f"signer      {summary.signer}")
    print(f"time span   {summary.first_time} .. {summary.last_time} ({summary.lines} lines)")
    print("trust       " + (str(root) if root else "root named by the log (give --root)"))
    for name, fingerprint in summary.ca_sha256.items():
        print(f"CA          {name}  sha256 {fingerprint}")
    print("devices     " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.devices.items())))
    print("serials     " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.serials.items())))
    print(f"files       {summary.files_checked} bundle files match their logged hashes")
    for failure in summary.failures:
        print(f"{failure['state']:<11} {failure['registration_id']}: {failure['reason']}")
    for void in summary.voids:
        print(f"void        {void['registration_id']} serial {void['serial']} (revoke)")


def _print_lifecycle(summary: LifecycleSummary, root: Path | None, as_json: bool) -> None:
    trust = str(root) if root else "root named by the log (give --root)"
    if as_json:
        print(json.dumps({"verified": True, "trust_anchor": trust, **summary.as_dict()}, indent=2))
        return
    print(f"station {summary.station}: lifecycle log VERIFIED")
    print(f"signer      {summary.signer}")
    print(f"time span   {summary.first_time} .. {summary.last_time} ({summary.lines} lines)")
    print(f"trust       {trust}")
    print("operations  " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.operations.items())))
    print(f"revoked     {summary.revoked_devices} devices")
    print("renewals    " + "  ".join(f"{k}: {v}" for k, v in summary.renewals.items()))
    print(f"files       {summary.files_checked} renewal files match their logged hashes")
    for crl in summary.crls:
        print(f"CRL         {crl['issuer']} number {crl['number']}: {crl['entries']} serials")
    for op in summary.unfinished:
        print(f"unfinished  {op} (resume it)")
