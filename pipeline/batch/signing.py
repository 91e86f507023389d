"""The station's signing set-up, done the same way in the orchestrator and in every worker:
log in to the station token, find the issuing key, check it against the chain."""

from __future__ import annotations

from dataclasses import dataclass

from pkcs11 import ObjectClass

from .. import hsm
from ..ca.builders import Issuer
from ..ca.chain import Chain, load_chain
from ..config.station import Station
from ..vocabulary import Custody


@dataclass(frozen=True)
class StationKeys:
    token: hsm.Token
    chain: Chain
    issuer: Issuer  # its key signs inside the token


def open_station_keys(station: Station) -> StationKeys:
    """The process's station token session and issuer. Raises if the issuing key does not
    match the chain's issuer certificate; errors name the station file and line of the
    setting (the token, the issuer key)."""
    config = station.hsm
    with station.located("hsm"):
        token = hsm.open_token(config.module, config.token, config.pin, config.softhsm2_conf)
    with station.located("ca.issuer_key"):
        _, issuer_key = hsm.resolve_signer(
            station.ca.issuer_key,
            module_path=config.module,
            pin=config.pin,
            softhsm2_conf=config.softhsm2_conf,
        )
    chain = load_chain(station)
    return StationKeys(token, chain, Issuer(chain.issuer, issuer_key, chain.pem()))


def find_transport_key(station: Station, token: hsm.Token) -> None:
    """Wrapped custody: the transport key must be in the token (exit 33, naming the setting's
    line). Checked after the mechanisms, so a token that cannot wrap at all says so first."""
    transport = station.custody.transport_key
    if transport is not None and station.custody.policy is Custody.WRAPPED:
        with station.located("custody.transport_key"):
            token.find(ObjectClass.SECRET_KEY, label=transport.object, key_id=transport.id)


def open_signer(station: Station, uri: hsm.Pkcs11Uri) -> hsm.HsmSigner:
    """Another signing key of the station (the audit key), with the station's HSM defaults.
    Errors name the station file and the line of the setting that names the key."""
    config = station.hsm
    if station.audit is not None and uri == station.audit.key:
        key = "audit.key"
    else:
        key = "ca.issuer_key" if uri == station.ca.issuer_key else "hsm"
    with station.located(key):
        _, signer = hsm.resolve_signer(
            uri, module_path=config.module, pin=config.pin, softhsm2_conf=config.softhsm2_conf
        )
    return signer
