"""``provline audit verify | show``: the auditor's offline view of a sealed batch (and of the
station lifecycle log and key-delivery logs, for ``verify``).

Without ``--root`` every check still runs, against the root the log names for itself; the
result is reported as UNANCHORED (naming that root) and the exit code is 61, never 0: only a
root the auditor brings anchors the signature outside the batch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509

from ..audit.fixture_verify import is_delivery_log, verify_delivery_log
from ..audit.lifecycle_verify import LifecycleSummary, is_lifecycle_log, verify_lifecycle
from ..audit.sealed import embedded_root
from ..audit.show import show_batch
from ..audit.verify import verify_batch
from ..ca.certs import load_cert, thumbprints
from ..errors import AuditUnanchored
from ..layout import AUDIT_SEAL
from .app import JsonOpt, audit_app, print_json

RootOpt = Annotated[
    Path | None,
    typer.Option(
        "--root",
        help="The trusted root certificate. Without it the log is checked against the root "
        "it names itself: UNANCHORED, exit 61.",
    ),
]


@audit_app.command("verify")
def audit_verify_cmd(
    batch_dir: Annotated[
        Path,
        typer.Argument(
            help="A batch directory, a station lifecycle directory, a fixture directory or a "
            "ceremony log directory."
        ),
    ],
    root: RootOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check the signature, the signer chain, the hash chain, every bundle file, every serial
    and report.json and report.txt, offline. A fixture's or a station's key-delivery log
    (its first line is log_start) gets the signature, chain and delivery checks. Exit 6
    naming the first bad line or file; 61 when every check passed but no --root anchors it."""
    anchor = load_cert(str(root), where="--root") if root else None
    if is_lifecycle_log(batch_dir):  # a station lifecycle directory (docs/lifecycle.md)
        _print_lifecycle(verify_lifecycle(batch_dir, anchor), batch_dir, root, as_json)
    elif is_delivery_log(batch_dir):  # a fixture's or a station's ceremony log
        log = verify_delivery_log(batch_dir, anchor)
        trust = _trust(batch_dir, root)
        if as_json:
            print_json("audit-verify", {**trust, "log": "delivery", **log.as_dict()})
        else:
            lines = log.lines_for_terminal(root)
            if root is None:
                lines[0] = lines[0].replace("VERIFIED", "checks passed, UNANCHORED")
            print("\n".join(lines))
            _say_unanchored(trust)
    else:
        summary = verify_batch(batch_dir, anchor)
        trust = _trust(batch_dir, root)
        if as_json:
            print_json("audit-verify", {**trust, "log": "batch", **summary.as_dict()})
        else:
            state = "VERIFIED" if root else "checks passed, UNANCHORED"
            print(f"batch {summary.batch_id} (station {summary.station}): audit log {state}")
            print(f"signer      {summary.signer}")
            print(
                f"time span   {summary.first_time} .. {summary.last_time} ({summary.lines} lines)"
            )
            print(f"trust       {_trust_text(trust)}")
            for name, fingerprint in summary.ca_sha256.items():
                print(f"CA          {name}  sha256 {fingerprint}")
            print(
                "devices     " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.devices.items()))
            )
            print(
                "serials     " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.serials.items()))
            )
            print(f"files       {summary.files_checked} bundle files match their logged hashes")
            print(
                "report      "
                + (
                    "report.json and report.txt match the hashes logged before the seal"
                    if summary.report_sealed
                    else "NOT covered by the seal (an older provline wrote this log): "
                    "compared with the log only"
                )
            )
            for failure in summary.failures:
                print(f"{failure['state']:<11} {failure['registration_id']}: {failure['reason']}")
            for void in summary.voids:
                print(f"void        {void['registration_id']} serial {void['serial']} (revoke)")
            _say_unanchored(trust)
    if root is None:
        raise typer.Exit(AuditUnanchored.exit_code)


@audit_app.command("show")
def audit_show_cmd(
    batch_dir: Annotated[Path, typer.Argument(help="A batch directory.")],
    root: RootOpt = None,
    as_json: JsonOpt = False,
    as_csv: Annotated[
        bool,
        typer.Option(
            "--csv",
            help="One row per device: registration id, device id, state, serial, "
            "thumbprints, registration outcome.",
        ),
    ] = False,
) -> None:
    """What happened in a batch, from its verified audit log: every run (started, resumed,
    aborted, killed) with times, station, operator, DPS endpoint and ID scope, CA uploads and
    proofs of possession, counts and exit code; failures with reasons; void serials. The log
    is verified first (exit 6 if it does not verify); without --root the view says
    UNANCHORED."""
    anchor = load_cert(str(root), where="--root") if root else None
    history = show_batch(batch_dir, anchor)
    if as_csv:
        history.write_csv(sys.stdout)
    elif as_json:
        print(json.dumps(history.to_json(), indent=2, default=str))
    else:
        print("\n".join(history.lines()))


def _trust(directory: Path, root: Path | None) -> dict[str, Any]:
    """Verified (anchored to the given root) or not, and the root the log names itself."""
    claimed = embedded_root(directory / AUDIT_SEAL)
    named = (
        {"subject": claimed.subject.rfc4514_string(), "sha256": thumbprints(claimed).sha256}
        if isinstance(claimed, x509.Certificate)
        else None
    )
    return {
        "verified": root is not None,
        "checks_passed": True,
        "anchored": root is not None,
        "trust_anchor": str(root) if root else None,
        "root_named_by_log": named,
    }


def _trust_text(trust: dict[str, Any]) -> str:
    if trust["anchored"]:
        return str(trust["trust_anchor"])
    named = trust["root_named_by_log"] or {}
    return (
        f"UNANCHORED: the root the log names, {named.get('subject', '?')} (sha256 "
        f"{named.get('sha256', '?')}); give --root"
    )


def _say_unanchored(trust: dict[str, Any]) -> None:
    if not trust["anchored"]:
        named = trust["root_named_by_log"] or {}
        print(
            "UNANCHORED: every check passed, but against the root the log names itself "
            f"({named.get('subject', '?')}, sha256 {named.get('sha256', '?')}): nothing outside "
            "the batch vouches for the signer. Give --root with the root you trust "
            f"(exit {AuditUnanchored.exit_code}).",
            file=sys.stderr,
        )


def _print_lifecycle(
    summary: LifecycleSummary, directory: Path, root: Path | None, as_json: bool
) -> None:
    trust = _trust(directory, root)
    if as_json:
        print_json("audit-verify", {**trust, "log": "lifecycle", **summary.as_dict()})
        return
    state = "VERIFIED" if root else "checks passed, UNANCHORED"
    print(f"station {summary.station}: lifecycle log {state}")
    print(f"signer      {summary.signer}")
    print(f"time span   {summary.first_time} .. {summary.last_time} ({summary.lines} lines)")
    print(f"trust       {_trust_text(trust)}")
    print("operations  " + "  ".join(f"{k}: {v}" for k, v in sorted(summary.operations.items())))
    print(f"revoked     {summary.revoked_devices} devices")
    print("renewals    " + "  ".join(f"{k}: {v}" for k, v in summary.renewals.items()))
    print(f"files       {summary.files_checked} renewal files match their logged hashes")
    for crl in summary.crls:
        print(f"CRL         {crl['issuer']} number {crl['number']}: {crl['entries']} serials")
    for op in summary.unfinished:
        print(f"unfinished  {op} (resume it)")
    _say_unanchored(trust)
