"""Capability negotiation: what a station needs from its token, what the token offers, and the
choice of mechanism for each function (docs/hsm.md has the tables and sources).

A token says what it can do through ``C_GetMechanismList`` and ``C_GetMechanismInfo`` (PKCS#11
v2.40 base specification, section 5.4): each mechanism with the functions it serves
(``CKF_SIGN``, ``CKF_GENERATE_KEY_PAIR``, ``CKF_WRAP``...) and its key sizes. A mechanism that
is listed without the flag a function needs does not count (the YubiHSM 2 lists
``CKM_AES_KEY_WRAP_KWP`` for internal use only, without ``CKF_WRAP``).

Every function provline uses is a :class:`Need` with one or more :class:`Option` s in order of
preference; :func:`evaluate` picks the first the token offers. Nothing here creates an object,
so a station is checked before any side effect.

Module facts that no query reveals (which module implements ``CKM_AES_KEY_WRAP_PAD`` as RFC
5649, object limits) are in :data:`KNOWN_MODULES`, matched on the module and token identity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pkcs11 import Mechanism, MechanismFlag

from ..errors import MechanismUnsupported
from ..keyprofile import KeyProfile
from .names import mechanism_name, short_mechanism_name
from .tokeninfo import TokenFigures

OK = "ok"
MISSING = "MISSING"
NOT_AVAILABLE = "not available"  # an optional function the token cannot serve
NOT_FOUND = "not found"  # a configured key is absent: a key problem (exit 33), not a mechanism


@dataclass(frozen=True)
class KnownModule:
    """What a module family is known to do beyond what it reports."""

    family: str
    pad_is_rfc5649: bool = False  # CKM_AES_KEY_WRAP_PAD (0x210A) produces RFC 5649 blobs
    max_objects: int | None = None  # objects the device holds, when the token cannot say
    objects_per_keypair: int = 2  # PKCS#11 objects one stored key pair costs


SOFTHSM2 = KnownModule("SoftHSM2", pad_is_rfc5649=True)
OPENCRYPTOKI = KnownModule("openCryptoki")
# YubiHSM 2: 256 object slots (Yubico's yubihsm.h YH_MAX_ITEMS_COUNT; "YubiHSM 2 Device
# Specifications", storage capacity); an asymmetric key is one object whose public half the
# PKCS#11 module shows as a second, virtual object.
YUBIHSM2 = KnownModule("YubiHSM 2", max_objects=256, objects_per_keypair=1)
UNKNOWN = KnownModule("unknown")


def identify(module_manufacturer: str, token_manufacturer: str, token_model: str) -> KnownModule:
    if module_manufacturer.startswith("SoftHSM") or token_model.startswith("SoftHSM"):
        return SOFTHSM2
    if token_model.startswith("YubiHSM") or token_manufacturer.startswith("Yubico"):
        return YUBIHSM2
    if token_model.startswith("IBM SoftTok") or (
        module_manufacturer.startswith("IBM") and "openCryptoki" in token_model
    ):
        return OPENCRYPTOKI
    return UNKNOWN


@dataclass(frozen=True)
class Offer:
    """One mechanism as C_GetMechanismInfo describes it."""

    mechanism: int
    flags: int
    min_key: int | None
    max_key: int | None


@dataclass
class Capabilities:
    """What one token offers, read once per process."""

    module_path: str
    module: dict[str, str]
    token: dict[str, str]
    figures: TokenFigures | None
    offers: dict[int, Offer]
    known: KnownModule = UNKNOWN

    def offered(self, mechanism: int, flag: MechanismFlag, key_size: int | None = None) -> bool:
        offer = self.offers.get(int(mechanism))
        if offer is None or not offer.flags & int(flag):
            return False
        if key_size is not None and offer.max_key:
            return (offer.min_key or 0) <= key_size <= offer.max_key
        return True

    def mechanisms(self) -> frozenset[int]:
        """Mechanisms usable for signing (the signers pick raw or hashed ones from these)."""
        return frozenset(m for m, o in self.offers.items() if o.flags & int(MechanismFlag.SIGN))

    def identity(self) -> dict[str, Any]:
        return {
            "module": {"path": self.module_path, **self.module, "family": self.known.family},
            "token": {**self.token, **(self.figures.to_json() if self.figures else {})},
        }


def read_capabilities(module_path: str, lib: Any, token: Any) -> Capabilities:
    """Query the module and token (no login needed, nothing created)."""
    from .errormap import translate
    from .tokeninfo import token_figures

    slot = token.slot
    with translate("list the token's mechanisms"):
        listed = slot.get_mechanisms()
    offers: dict[int, Offer] = {}
    for mechanism in listed:
        code = int(mechanism)
        try:
            with translate("read mechanism information", code):
                info = slot.get_mechanism_info(code)
        except Exception:  # listed but not describable: treat as absent
            continue
        offers[code] = Offer(code, int(info.flags), info.min_key_length, info.max_key_length)
    module = {
        "manufacturer": lib.manufacturer_id.strip(),
        "description": lib.library_description.strip(),
        "version": "{}.{}".format(*lib.library_version),
        "cryptoki": "{}.{}".format(*lib.cryptoki_version),
    }
    token_info = {
        "label": token.label.strip(),
        "manufacturer": token.manufacturer_id.strip(),
        "model": token.model.strip(),
        "serial": token.serial.decode(errors="replace").strip(),
    }
    return Capabilities(
        module_path=module_path,
        module=module,
        token=token_info,
        figures=token_figures(module_path, slot.slot_id),
        offers=offers,
        known=identify(module["manufacturer"], token_info["manufacturer"], token_info["model"]),
    )


# ------------------------------------------------------------------------- what we need
@dataclass(frozen=True)
class Option:
    """One way to serve a function: a mechanism used for ``flag``, and how provline uses it."""

    mechanism: int
    flag: MechanismFlag
    how: str
    key_size: int | None = None  # bits (EC, RSA) or bytes (AES), as C_GetMechanismInfo counts
    families: tuple[str, ...] = ()  # only valid on these module families (empty: any)

    def name(self) -> str:
        return short_mechanism_name(self.mechanism)


@dataclass(frozen=True)
class Need:
    function: str  # what provline does, e.g. "sign certificates and CRLs"
    needed_by: str  # which configuration needs it, e.g. "issuing CA key (ec-p256)"
    options: tuple[Option, ...]
    required: bool = True


_EC_CURVE_BITS = {KeyProfile.EC_P256: 256, KeyProfile.EC_P384: 384}
_HASHED_ECDSA = {"sha256": Mechanism.ECDSA_SHA256, "sha384": Mechanism.ECDSA_SHA384}
_HASHED_RSA = {"sha256": Mechanism.SHA256_RSA_PKCS, "sha384": Mechanism.SHA384_RSA_PKCS}


def signing_options(profile: KeyProfile) -> tuple[Option, ...]:
    """Raw CKM_ECDSA with the hash computed on the host works on every EC token and is
    preferred; the hashed mechanism serves tokens without it. For RSA the hashed PKCS#1 v1.5
    mechanism is preferred; raw CKM_RSA_PKCS over a DigestInfo made on the host serves
    tokens without it (openCryptoki 3.8)."""
    hash_name = profile.hash().name
    label = hash_name.upper().replace("SHA", "SHA-")
    if profile.is_ec:
        return (
            Option(Mechanism.ECDSA, MechanismFlag.SIGN, f"{label} on the host"),
            Option(_HASHED_ECDSA[hash_name], MechanismFlag.SIGN, f"{label} in the token"),
        )
    return (
        Option(_HASHED_RSA[hash_name], MechanismFlag.SIGN, f"PKCS#1 v1.5, {label} in the token"),
        Option(Mechanism.RSA_PKCS, MechanismFlag.SIGN, f"PKCS#1 v1.5, {label} on the host"),
    )


def keygen_options(profile: KeyProfile) -> tuple[Option, ...]:
    if profile.is_ec:
        return (
            Option(
                Mechanism.EC_KEY_PAIR_GEN,
                MechanismFlag.GENERATE_KEY_PAIR,
                f"{profile.value} key pair",
                key_size=_EC_CURVE_BITS[profile],
            ),
        )
    return (
        Option(
            Mechanism.RSA_PKCS_KEY_PAIR_GEN,
            MechanismFlag.GENERATE_KEY_PAIR,
            f"RSA-{profile.rsa_bits} key pair",
            key_size=profile.rsa_bits,
        ),
    )


# RFC 5649 key wrap. CKM_AES_KEY_WRAP_KWP (0x210B, PKCS#11 v3.0) is RFC 5649 by definition.
# 0x210A, CKM_AES_KEY_WRAP_PAD, was RFC 3394 over PKCS#7 padding in PKCS#11 v2.40 drafts and
# means different things in different modules; only SoftHSM2 is known to implement it as
# RFC 5649 (after zero-padding the key data to a multiple of 8 bytes).
WRAP_OPTIONS = (
    Option(Mechanism.AES_KEY_WRAP_KWP, MechanismFlag.WRAP, "RFC 5649"),
    Option(
        Mechanism.AES_KEY_WRAP_PAD,
        MechanismFlag.WRAP,
        "RFC 5649 (SoftHSM2's CKM_AES_KEY_WRAP_PAD)",
        families=(SOFTHSM2.family,),
    ),
)
TRANSPORT_KEYGEN = Option(
    Mechanism.AES_KEY_GEN, MechanismFlag.GENERATE, "AES-256 transport key", key_size=32
)


def signing_need(profile: KeyProfile, needed_by: str, function: str) -> Need:
    return Need(function, needed_by, signing_options(profile))


def keygen_need(profile: KeyProfile, needed_by: str, function: str = "generate key pairs") -> Need:
    return Need(function, needed_by, keygen_options(profile))


def wrap_need(needed_by: str) -> Need:
    return Need("wrap device keys (RFC 5649)", needed_by, WRAP_OPTIONS)


# ---------------------------------------------------------------------------- verdicts
@dataclass(frozen=True)
class Row:
    """One line of the capability table."""

    function: str
    needed_by: str
    uses: str  # the chosen mechanism and how, or what was looked for
    status: str  # OK, MISSING, NOT_AVAILABLE, NOT_FOUND
    detail: str = ""

    @property
    def blocking(self) -> bool:
        return self.status == MISSING

    def problem(self) -> str:
        return f"{self.function} ({self.needed_by}): {self.detail or self.uses}"

    def to_json(self) -> dict[str, str]:
        return {k: v for k, v in self.__dict__.items()}


def choose(caps: Capabilities, need: Need) -> tuple[Option | None, list[str]]:
    """The first option the token serves, and why the others do not."""
    why_not: list[str] = []
    for option in need.options:
        name = mechanism_name(option.mechanism)
        if option.families and caps.known.family not in option.families:
            why_not.append(f"{name} is RFC 5649 only on {', '.join(option.families)}")
            continue
        offer = caps.offers.get(int(option.mechanism))
        if offer is None:
            why_not.append(f"{name} not offered")
            continue
        if not offer.flags & int(option.flag):
            why_not.append(f"{name} offered without {option.flag.name}")
            continue
        if not caps.offered(option.mechanism, option.flag, option.key_size):
            why_not.append(
                f"{name} offers key sizes {offer.min_key}..{offer.max_key}, not {option.key_size}"
            )
            continue
        return option, why_not
    return None, why_not


def evaluate(caps: Capabilities, need: Need) -> Row:
    option, why_not = choose(caps, need)
    if option is not None:
        return Row(need.function, need.needed_by, f"{option.name()} ({option.how})", OK)
    wanted = " or ".join(o.name() for o in need.options)
    return Row(
        need.function,
        need.needed_by,
        wanted,
        MISSING if need.required else NOT_AVAILABLE,
        "; ".join(why_not),
    )


@dataclass
class CapabilityReport:
    """The table `provline hsm check` and `provline plan` print."""

    caps: Capabilities
    rows: list[Row] = field(default_factory=list)

    @property
    def missing(self) -> list[Row]:
        return [r for r in self.rows if r.blocking]

    def to_json(self) -> dict[str, Any]:
        return {
            **self.caps.identity(),
            "functions": [r.to_json() for r in self.rows],
            "ok": not self.missing,
        }

    def lines(self) -> list[str]:
        return format_report(self.to_json())

    def require(self, where: str = "") -> None:
        if self.missing:
            raise CapabilitiesMissing(self.caps.token.get("label", ""), self.missing, where)


def format_report(data: dict[str, Any]) -> list[str]:
    """The table, from :meth:`CapabilityReport.to_json` (so `plan --json` callers and the
    terminal see the same facts)."""
    module, token = data["module"], data["token"]
    out = [
        f"module  {module['path']}: {module['manufacturer']}, {module['description']} "
        f"{module['version']} (Cryptoki {module['cryptoki']}; known as: {module['family']})",
        f"token   {token['label']}: {token['manufacturer']}, {token['model']}, "
        f"serial {token['serial']}{_figures_text(token)}",
    ]
    rows = [("function", "needed by", "mechanism or attribute", "token")] + [
        (r["function"], r["needed_by"], r["uses"], r["status"]) for r in data["functions"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        out.append("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for r in data["functions"]:
        if r["status"] != OK and r["detail"]:
            out.append(f"{r['status']}: {r['function']} ({r['needed_by']}): {r['detail']}")
    return out


def _figures_text(token: dict[str, Any]) -> str:
    if "min_pin" not in token:
        return ""

    def mem(kind: str) -> str:
        free, total = token[f"free_{kind}_memory"], token[f"total_{kind}_memory"]
        if free is None and total is None:
            return "not reported"
        return f"{'?' if free is None else free} of {'?' if total is None else total} bytes free"

    pin = (
        f"PIN {token['min_pin']}..{token['max_pin']} characters"
        if token["min_pin"] is not None
        else "PIN length not reported"
    )
    return f"; {pin}; public memory {mem('public')}; private memory {mem('private')}"


class CapabilitiesMissing(MechanismUnsupported):
    """The token lacks something the configuration needs; one line per missing function."""

    def __init__(self, token: str, rows: list[Row], where: str = "") -> None:
        self.problems = [f"token {token}: {r.problem()}" for r in rows]
        super().__init__(
            self.problems[0], where=where, rule="mechanisms the token offers: `provline hsm check`"
        )

    def line(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return "\n".join(f"{prefix}{p} ({self.rule})" for p in self.problems)


def require(caps: Capabilities, needs: list[Need], where: str = "") -> list[Option | None]:
    """The chosen option of every need (``None`` only for an optional need the token cannot
    serve), or :class:`CapabilitiesMissing` naming every required one it lacks."""
    CapabilityReport(caps, [evaluate(caps, n) for n in needs]).require(where)
    return [choose(caps, need)[0] for need in needs]
