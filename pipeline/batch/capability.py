"""What a station needs from its token, function by function, against what the token offers
(docs/hsm.md): the table `provline hsm check` and `provline plan` print, and the check
`provline run` makes before its first side effect.

Functions and what needs them:

* sign certificates and CRLs: the issuing CA key (its profile from ``ca.chain``);
* seal the audit log: the audit key (its profile from ``audit.cert``);
* generate device key pairs: retain and wrapped custody, per key profile (the manifest's, or
  every profile the station allows);
* wrap device keys with RFC 5649, and identify the transport key: wrapped custody;
* store device keys: retain custody, against the token's object limit (``hsm.max_objects``,
  or what is known of the device, e.g. 256 objects on a YubiHSM 2);
* sign with a retained device key (``provline verify-device``): retain custody, optional.
"""

from __future__ import annotations

from pathlib import Path

from pkcs11 import ObjectClass

from .. import hsm
from ..ca.certs import load_cert
from ..ca.chain import load_chain
from ..config.manifest import Manifest
from ..config.station import Station
from ..errors import KeyNotFound, ProvlineError
from ..hsm.capabilities import (
    MISSING,
    NOT_AVAILABLE,
    NOT_FOUND,
    OK,
    CapabilityReport,
    Need,
    Option,
    Row,
    choose,
    evaluate,
    keygen_need,
    signing_options,
    wrap_need,
)
from ..hsm.transport import CHECK_VALUE
from ..hsm.transport import identify as identify_transport_key
from ..keyprofile import KeyProfile
from ..vocabulary import Custody, DeviceState
from .journal import Journal

_TO_ISSUE = {DeviceState.PLANNED, DeviceState.INTENT, DeviceState.FAILED}


def devices_to_issue(manifest: Manifest, batch_dir: Path) -> int:
    """Devices a run would still issue: all of them for a new batch, else those the journal
    has not bundled (an upper bound on the keys a retain run makes: a retried device may
    reuse its key)."""
    if not Journal.exists(batch_dir):
        return len(manifest)
    journal = Journal.open(batch_dir, create=False)
    try:
        return sum(1 for _, state, _ in journal.device_rows() if state in _TO_ISSUE)
    finally:
        journal.close()


def station_report(
    station: Station, manifest: Manifest | None = None, token: hsm.Token | None = None
) -> CapabilityReport:
    """The capability table for ``station`` (and ``manifest``, when given). Reads the token;
    creates nothing that outlives the call."""
    config = station.hsm
    token = token or hsm.open_token(config.module, config.token, config.pin, config.softhsm2_conf)
    caps = token.capabilities()
    rows: list[Row] = []
    issuer = KeyProfile.of_public_key(load_chain(station).issuer.public_key())
    rows.append(
        evaluate(
            caps,
            Need(
                "sign certificates and CRLs",
                f"issuing CA key ({issuer})",
                signing_options(issuer),
            ),
        )
    )
    if station.audit is not None and station.audit.cert.is_file():
        audit = KeyProfile.of_public_key(load_cert(str(station.audit.cert)).public_key())
        rows.append(
            evaluate(
                caps, Need("seal the audit log", f"audit key ({audit})", signing_options(audit))
            )
        )
    policy = station.custody.policy
    profiles = (manifest.key_profile,) if manifest else station.key_profiles
    if policy in (Custody.RETAIN, Custody.WRAPPED):
        for profile in profiles:
            rows.append(
                evaluate(
                    caps,
                    keygen_need(
                        profile,
                        f"custody {policy}, key profile {profile}",
                        "generate device key pairs",
                    ),
                )
            )
    if policy is Custody.WRAPPED:
        wrap = wrap_need("custody wrapped")
        rows.append(evaluate(caps, wrap))
        rows.append(_transport_row(station, token, choose(caps, wrap)[0]))
    if policy is Custody.RETAIN:
        for profile in profiles:
            rows.append(
                evaluate(
                    caps,
                    Need(
                        "sign with a retained device key",
                        f"provline verify-device, key profile {profile}",
                        signing_options(profile),
                        required=False,
                    ),
                )
            )
        devices = (
            devices_to_issue(manifest, station.output / manifest.batch_id) if manifest else None
        )
        rows.append(_capacity_row(station, token, devices))
    return CapabilityReport(caps, rows)


def require_station_capabilities(
    token: hsm.Token, station: Station, manifest: Manifest
) -> CapabilityReport:
    """Refuse a run, naming every missing mechanism or the lack of room, before any side
    effect (`provline run` calls this while planning)."""
    report = station_report(station, manifest, token)
    report.require(where=str(station.path))
    return report


def _transport_row(station: Station, token: hsm.Token, wrap: Option | None) -> Row:
    function, needed_by = "identify the transport key", "custody wrapped"
    uri = station.custody.transport_key
    if uri is None:
        return Row(function, needed_by, "custody.transport_key", MISSING, "not configured")
    try:
        key = token.find(ObjectClass.SECRET_KEY, label=uri.object, key_id=uri.id)
        kcv = hsm.check_value(key)
        if kcv:
            return Row(function, needed_by, f"{CHECK_VALUE} {kcv}", OK)
        if wrap is None:
            return Row(
                function,
                needed_by,
                "CKA_CHECK_VALUE or wrap-check-v1",
                MISSING,
                "no CKA_CHECK_VALUE and no RFC 5649 wrap mechanism for the wrap check",
            )
        check = identify_transport_key(token.session, key, wrap.mechanism)
        return Row(
            function,
            needed_by,
            f"{check.method} with {check.mechanism} (the token has no CKA_CHECK_VALUE)",
            OK,
        )
    except KeyNotFound as exc:  # refused by the key lookup itself, with the setting's line
        return Row(function, needed_by, str(uri), NOT_FOUND, exc.what)
    except ProvlineError as exc:
        return Row(function, needed_by, str(uri), MISSING, exc.what)


def _capacity_row(station: Station, token: hsm.Token, devices: int | None) -> Row:
    """Retained keys stay in the token: refuse a batch that would not fit, before it starts."""
    caps = token.capabilities()
    known = caps.known
    limit = station.hsm.max_objects or known.max_objects
    source = "hsm.max_objects" if station.hsm.max_objects else f"known limit of {known.family}"
    # A YubiHSM 2 stores a key pair as one object but its module shows two (the public half
    # is virtual): count what occupies the device.
    in_use = token.count_objects(skip_public=known.objects_per_keypair == 1)
    function, needed_by = "store device keys in the token", "custody retain"
    per_device = known.objects_per_keypair
    need_text = (
        f"{devices * per_device} objects for {devices} devices" if devices is not None else ""
    )
    if limit is None:
        uses = "; ".join(
            filter(None, [need_text, f"{in_use} objects in use, no object limit known"])
        )
        return Row(function, needed_by, uses + " (set hsm.max_objects for a fixed-size token)", OK)
    free = limit - in_use
    uses = "; ".join(filter(None, [need_text, f"{in_use} of {limit} objects in use ({source})"]))
    if devices is not None and devices * per_device > free:
        return Row(
            function,
            needed_by,
            uses,
            MISSING,
            f"{devices} devices need {devices * per_device} objects but only {free} are free "
            f"of {limit} ({source}); split the batch or free the token",
        )
    return Row(function, needed_by, uses, OK if free > 0 or devices == 0 else NOT_AVAILABLE)
