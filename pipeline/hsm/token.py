"""Tokens through python-pkcs11: one logged-in session per token per process.

Rules this module enforces (measured on SoftHSM2 2.6 and python-pkcs11 0.10; the PKCS#11
v2.40 base specification, section 5.6 "Session management", explains the login rules):

* Login state belongs to the application, not the session: a second PIN login raises
  ``UserAlreadyLoggedIn`` and closing a PIN session logs out every other session. So each
  process opens one session per token and keeps it for its whole life (:func:`open_token`).
* python-pkcs11 + SoftHSM2 are not thread-safe (python-pkcs11 calls ``C_Initialize(NULL)``,
  which tells SoftHSM2 not to lock): use one thread per process, and worker *processes*
  (spawn) for parallelism.
* Tokens are selected by label, never by slot number (SoftHSM2 slot ids are random).
* A wrong PIN is never retried: tokens count failures towards a lockout.
* ``SOFTHSM2_CONF`` is read at ``C_Initialize``, so it is set before the module is loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pkcs11
import pkcs11.exceptions as p11e
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from ..errors import (
    HsmError,
    InputError,
    KeyNotFound,
    MechanismUnsupported,
    ModuleLoadError,
    PinError,
    TokenNotFound,
)
from ..keyprofile import KeyProfile, PublicKey
from ..secret import SecretRef
from . import capabilities as caps_
from .capabilities import Capabilities, Need, keygen_need, signing_need
from .errormap import call, raise_mapped, translate
from .names import return_value_name
from .signers import HsmSigner, signer_for
from .uri import Pkcs11Uri

# Debian's SoftHSM2 path: the default for demos and tests only. A station names its module
# (hsm.module, --module or PROVLINE_PKCS11_MODULE); nothing else assumes SoftHSM2.
DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def public_key_of(p11_public: Any) -> PublicKey:
    """The cryptography public key of a token public-key object."""
    if p11_public.key_type == KeyType.EC:
        params = p11_public[Attribute.EC_PARAMS]
        curve: ec.EllipticCurve = (
            ec.SECP384R1() if params == _EC_PARAMS[KeyProfile.EC_P384] else ec.SECP256R1()
        )
        if params not in (_EC_PARAMS[KeyProfile.EC_P256], _EC_PARAMS[KeyProfile.EC_P384]):
            raise MechanismUnsupported("EC key on an unsupported curve", rule="key profiles")
        return ec.EllipticCurvePublicKey.from_encoded_point(
            curve, _der_octet_string(p11_public[Attribute.EC_POINT])
        )
    if p11_public.key_type == KeyType.RSA:
        n = int.from_bytes(p11_public[Attribute.MODULUS], "big")
        e = int.from_bytes(p11_public[Attribute.PUBLIC_EXPONENT], "big")
        return rsa.RSAPublicNumbers(e, n).public_key()
    raise MechanismUnsupported(f"key type {p11_public.key_type}", rule="key profiles")


def _der_octet_string(der: bytes) -> bytes:
    """SoftHSM2 returns CKA_EC_POINT as a DER OCTET STRING around the X9.62 point."""
    if der[:1] != b"\x04" or len(der) < 2:
        return der
    length = der[1]
    if length < 0x80:
        return der[2 : 2 + length]
    size = length & 0x7F
    return der[2 + size : 2 + size + int.from_bytes(der[2 : 2 + size], "big")]


def _ec_params(curve_name: str) -> bytes:
    from pkcs11.util.ec import encode_named_curve_parameters

    return bytes(encode_named_curve_parameters(curve_name))


_EC_PARAMS = {
    KeyProfile.EC_P256: _ec_params("secp256r1"),
    KeyProfile.EC_P384: _ec_params("secp384r1"),
}


def key_id_for(public: PublicKey) -> bytes:
    """CKA_ID = SHA-1 of the public key's SubjectPublicKeyInfo bit string (as in SKI)."""
    return x509.SubjectKeyIdentifier.from_public_key(public).digest


@dataclass
class Token:
    """One logged-in R/W session on one token, for the life of the process."""

    module_path: str
    label: str
    session: Any
    lib: Any = None
    _caps: Capabilities | None = field(default=None, repr=False)

    # -- capabilities ---------------------------------------------------------------
    def capabilities(self) -> Capabilities:
        """What the module and token offer, read once (no object is created)."""
        if self._caps is None:
            self._caps = caps_.read_capabilities(self.module_path, self.lib, self.session.token)
        return self._caps

    def require(self, needs: list[Need]) -> list[caps_.Option | None]:
        """Refuse, naming every missing mechanism, before any side effect."""
        return caps_.require(self.capabilities(), needs, where=f"token {self.label}")

    # -- undo ---------------------------------------------------------------------------
    @contextmanager
    def undo_on_failure(self) -> Iterator[list[Any]]:
        """Objects appended to the yielded list are destroyed if the block fails, so a
        ceremony either completes or leaves the token as it found it."""
        created: list[Any] = []
        try:
            yield created
        except BaseException:
            for obj in reversed(created):
                # Already gone, or the token went away: nothing more can be undone here.
                with suppress(p11e.PKCS11Error):
                    obj.destroy()
            raise

    # -- key generation -------------------------------------------------------------
    def generate_keypair(
        self,
        profile: KeyProfile,
        *,
        label: str | None = None,
        key_id: bytes | None = None,
        persistent: bool = True,
        wrappable: bool = False,
        needed_by: str = "",
    ) -> tuple[Any, Any]:
        """A signing key pair. ``persistent`` makes token objects (CKA_TOKEN); otherwise they
        are session objects that vanish with the session. ``wrappable`` keeps the private key
        SENSITIVE but lets a trusted AES key wrap it (wrapped custody); otherwise it is
        never extractable."""
        private_template: dict[Attribute, Any] = {
            Attribute.TOKEN: persistent,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: wrappable,
            Attribute.SIGN: True,
        }
        public_template: dict[Attribute, Any] = {Attribute.TOKEN: persistent}
        kwargs: dict[str, Any] = {
            "store": persistent,
            "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
            "public_template": public_template,
            "private_template": private_template,
        }
        if label is not None:
            kwargs["label"] = label
        if key_id is not None:
            kwargs["id"] = key_id
        pair: tuple[Any, Any]
        if profile.is_ec:
            private_template[Attribute.DERIVE] = False
            public_template[Attribute.EC_PARAMS] = _EC_PARAMS[profile]
            with translate("generate a key pair", Mechanism.EC_KEY_PAIR_GEN, needed_by):
                pair = self.session.generate_keypair(KeyType.EC, **kwargs)
            return pair
        private_template[Attribute.DECRYPT] = False
        with translate("generate a key pair", Mechanism.RSA_PKCS_KEY_PAIR_GEN, needed_by):
            pair = self.session.generate_keypair(KeyType.RSA, profile.rsa_bits, **kwargs)
        return pair

    def require_free_label(self, object_class: ObjectClass, label: str) -> None:
        if list(
            call(self.session.get_objects, {Attribute.CLASS: object_class, Attribute.LABEL: label})
        ):
            kind = "secret key" if object_class == ObjectClass.SECRET_KEY else "private key"
            raise InputError(
                f"token {self.label} already holds a {kind} labelled {label!r}",
                rule="key labels are unique in a token",
            )

    def generate_named_keypair(
        self, profile: KeyProfile, label: str, created: list[Any], needed_by: str
    ) -> HsmSigner:
        """A non-extractable token key pair labelled ``label`` with CKA_ID = SHA-1 of its
        public key (the SKI), so the certificate finds its key by id. Refuses a taken label
        or a token that cannot generate or sign with ``profile``, before creating anything;
        the new objects go into ``created`` (see :meth:`undo_on_failure`)."""
        self.require(
            [
                keygen_need(profile, needed_by, "generate the key pair"),
                signing_need(profile, needed_by, "sign with it"),
            ]
        )
        self.require_free_label(ObjectClass.PRIVATE_KEY, label)
        public_obj, private_obj = self.generate_keypair(profile, label=label, needed_by=needed_by)
        created += [public_obj, private_obj]
        public = public_key_of(public_obj)
        key_id = key_id_for(public)
        for obj in (public_obj, private_obj):
            call(obj.__setitem__, Attribute.ID, key_id)
        return signer_for(private_obj, public, self.capabilities().mechanisms(), needed_by)

    def generate_transport_key(
        self, label: str, created: list[Any], *, deliverable: bool = True
    ) -> Any:
        """AES-256 token key that can only wrap and unwrap, never modifiable.

        ``deliverable`` (the default): extractable, but only by wrapping under a key the
        token's security officer marked trusted (``CKA_WRAP_WITH_TRUSTED``, PKCS#11 v2.40 base
        specification section 4.10): the key ``provline ca transport-handover`` gives to a
        programming fixture (docs/key-delivery.md). A token that cannot make such a key is
        refused, with nothing created, rather than given a key any wrapping key could
        extract. Otherwise the key is never extractable and no fixture can ever unwrap what
        it wraps."""
        template: dict[Attribute, Any] = {
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: deliverable,
            Attribute.ENCRYPT: False,
            Attribute.DECRYPT: False,
            Attribute.SIGN: False,
            Attribute.VERIFY: False,
            Attribute.MODIFIABLE: False,
        }
        if deliverable:
            template[Attribute.WRAP_WITH_TRUSTED] = True
        operation = "generate the transport key"
        try:
            key = self.session.generate_key(
                KeyType.AES,
                256,
                label=label,
                id=label.encode(),
                store=True,
                capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                template=template,
            )
        except _TEMPLATE_REFUSALS as exc:
            if deliverable:
                raise MechanismUnsupported(
                    f"{operation}: token {self.label} refuses CKA_WRAP_WITH_TRUSTED "
                    f"({return_value_name(exc)}), so it cannot limit who may extract the key",
                    rule="docs/key-delivery.md, tokens without trusted wrapping",
                ) from exc
            raise_mapped(exc, operation, Mechanism.AES_KEY_GEN, "custody wrapped")
        except p11e.PKCS11Error as exc:
            raise_mapped(exc, operation, Mechanism.AES_KEY_GEN, "custody wrapped")
        created.append(key)
        return key

    def wrap(self, wrapping_key: Any, key: Any, mechanism: int, needed_by: str = "") -> bytes:
        """C_WrapKey of ``key`` (its PKCS#8 encoding) under ``wrapping_key``."""
        with translate("wrap a device key", mechanism, needed_by):
            return bytes(wrapping_key.wrap_key(key, mechanism=mechanism))

    def count_objects(self, skip_public: bool = False) -> int:
        """Token objects this session can see (public ones and the user's private ones);
        other users' private objects on a shared partition are not counted, nor session
        objects (they vanish with their session and are not what fills a token)."""
        with translate("list objects"):
            objects = list(self.session.get_objects({Attribute.TOKEN: True}))
        if skip_public:
            return sum(1 for o in objects if o.object_class != ObjectClass.PUBLIC_KEY)
        return len(objects)

    # -- lookup -----------------------------------------------------------------------
    def find(
        self, object_class: ObjectClass, *, label: str | None = None, key_id: bytes | None = None
    ) -> Any:
        attrs: dict[Attribute, Any] = {Attribute.CLASS: object_class}
        if label is not None:
            attrs[Attribute.LABEL] = label
        if key_id is not None:
            attrs[Attribute.ID] = key_id
        found = list(call(self.session.get_objects, attrs))
        what = f"{object_class.name.lower()} object" + (f" labelled {label!r}" if label else "")
        where = f"token {self.label}"
        if not found:
            raise KeyNotFound(f"no {what}", where=where, rule="key present in the token")
        if len(found) > 1:
            raise KeyNotFound(
                f"{len(found)} {what}s; give an id too",
                where=where,
                rule="a key reference names exactly one object",
            )
        return found[0]

    def objects(self, object_class: ObjectClass) -> list[Any]:
        return list(call(self.session.get_objects, {Attribute.CLASS: object_class}))

    def signer(
        self, *, label: str | None = None, key_id: bytes | None = None, needed_by: str = ""
    ) -> HsmSigner:
        """A cryptography private key whose ``sign`` runs in the token, with the raw or
        hashed mechanism the token offers."""
        private = self.find(ObjectClass.PRIVATE_KEY, label=label, key_id=key_id)
        public_obj = self.find(ObjectClass.PUBLIC_KEY, label=label, key_id=key_id)
        return signer_for(
            private, public_key_of(public_obj), self.capabilities().mechanisms(), needed_by
        )

    def uri(
        self, *, label: str | None, key_id: bytes | None = None, type_: str = "private"
    ) -> Pkcs11Uri:
        return Pkcs11Uri(token=self.label, object=label, id=key_id, type=type_)

    def attributes(self, obj: Any, names: list[Attribute]) -> dict[str, Any]:
        values = call(obj.get_attributes, names)
        return {Attribute(k).name: v for k, v in values.items()}


_TEMPLATE_REFUSALS = (
    p11e.AttributeTypeInvalid,
    p11e.AttributeValueInvalid,
    p11e.AttributeReadOnly,
    p11e.TemplateInconsistent,
)

_TOKENS: dict[tuple[str, str], Token] = {}
_LIB_CONF: dict[str, str | None] = {}


def load_module(module_path: str, softhsm2_conf: str | None = None) -> Any:
    """Load the PKCS#11 module once per process. ``softhsm2_conf`` is exported first, because
    SoftHSM2 reads it at C_Initialize and python-pkcs11 caches the module per path."""
    if softhsm2_conf:
        if module_path in _LIB_CONF and _LIB_CONF[module_path] != softhsm2_conf:
            raise HsmError(
                f"module already loaded with SOFTHSM2_CONF={_LIB_CONF[module_path]}",
                rule="one SoftHSM2 config per process",
            )
        os.environ["SOFTHSM2_CONF"] = softhsm2_conf
    if "/" in module_path and not os.path.exists(module_path):
        default = (
            " (the SoftHSM2 default; name your HSM's module)"
            if module_path == DEFAULT_MODULE
            else ""
        )
        raise ModuleLoadError(
            f"PKCS#11 module {module_path} does not exist{default}",
            rule="hsm.module, --module or PROVLINE_PKCS11_MODULE names a loadable PKCS#11 library",
        )
    try:
        lib = pkcs11.lib(module_path)
    except (p11e.PKCS11Error, OSError, RuntimeError) as exc:
        raise ModuleLoadError(
            f"cannot load PKCS#11 module {module_path}: {exc}",
            rule="hsm.module names a loadable PKCS#11 library",
        ) from exc
    _LIB_CONF.setdefault(module_path, softhsm2_conf or os.environ.get("SOFTHSM2_CONF"))
    return lib


def _find_token(lib: Any, module_path: str, label: str) -> Any:
    try:
        return lib.get_token(token_label=label)
    except p11e.NoSuchToken as exc:
        raise TokenNotFound(
            f"no token labelled {label!r} in {module_path}",
            rule="hsm.token names an initialised token",
        ) from exc
    except p11e.MultipleTokensReturned as exc:
        raise TokenNotFound(
            f"several tokens labelled {label!r}", rule="token labels are unique"
        ) from exc
    except p11e.PKCS11Error as exc:
        raise HsmError(f"cannot list tokens: {type(exc).__name__}") from exc


def open_token(
    module_path: str, label: str, pin: SecretRef, softhsm2_conf: str | None = None
) -> Token:
    """The process's one logged-in session on ``label``; opened on first use."""
    key = (module_path, label)
    if key in _TOKENS:
        return _TOKENS[key]
    lib = load_module(module_path, softhsm2_conf)
    pin_value = pin.read(where=f"token {label}")
    token = _find_token(lib, module_path, label)
    try:
        session = token.open(rw=True, user_pin=pin_value)
    except p11e.PinLenRange as exc:
        raise PinError(
            f"the PIN for token {label!r} has a length the token refuses"
            + _pin_limits(module_path, token),
            rule="user PIN",
        ) from exc
    except (p11e.PinIncorrect, p11e.PinInvalid) as exc:
        raise PinError(
            f"wrong PIN for token {label!r} (not retried: the token counts failures)",
            rule="user PIN",
        ) from exc
    except p11e.PinLocked as exc:
        raise PinError(f"PIN of token {label!r} is locked", rule="user PIN") from exc
    except p11e.UserAlreadyLoggedIn:
        session = token.open(rw=True)
    except p11e.PKCS11Error as exc:
        raise HsmError(f"cannot open token {label!r}: {type(exc).__name__}") from exc
    opened = Token(module_path=module_path, label=label, session=session, lib=lib)
    _TOKENS[key] = opened
    return opened


@contextmanager
def so_session(
    module_path: str, label: str, so_pin: SecretRef, softhsm2_conf: str | None = None
) -> Iterator[Any]:
    """A security-officer R/W session for the one step only the SO may take: creating a
    trusted key (``CKA_TRUSTED`` is settable by the SO only, PKCS#11 v2.40 base specification
    section 4.8). Login state belongs to the application, so the SO step must run before
    this process opens its user session on the token; the SO is logged out when the block
    ends, and the user session may then be opened."""
    if (module_path, label) in _TOKENS:
        raise HsmError(
            f"token {label!r} already has a user session in this process",
            rule="the security officer's step runs before any user step",
        )
    lib = load_module(module_path, softhsm2_conf)
    pin_value = so_pin.read(where=f"SO PIN of token {label}")
    token = _find_token(lib, module_path, label)
    try:
        session = token.open(rw=True, so_pin=pin_value)
    except (p11e.PinIncorrect, p11e.PinInvalid, p11e.PinLenRange) as exc:
        raise PinError(
            f"wrong SO PIN for token {label!r} (not retried: the token counts failures)",
            rule="security officer PIN",
        ) from exc
    except p11e.PinLocked as exc:
        raise PinError(f"SO PIN of token {label!r} is locked", rule="SO PIN") from exc
    except p11e.PKCS11Error as exc:
        raise HsmError(
            f"cannot open an SO session on token {label!r} ({return_value_name(exc)})",
            rule="no other session of this application is logged in",
        ) from exc
    try:
        yield session
    finally:
        with suppress(p11e.PKCS11Error):  # logs the SO out (C_CloseSession, then C_Logout)
            session.close()


def _pin_limits(module_path: str, token: Any) -> str:
    from .tokeninfo import token_figures

    figures = token_figures(module_path, token.slot.slot_id)
    if figures is None or figures.min_pin is None or figures.max_pin is None:
        return ""
    return f" (it takes {figures.min_pin} to {figures.max_pin} characters)"


def resolve_signer(
    uri: Pkcs11Uri,
    *,
    module_path: str,
    pin: SecretRef,
    softhsm2_conf: str | None = None,
    needed_by: str = "",
) -> tuple[Token, HsmSigner]:
    """The token and signer a URI names. The URI's own module-path and pin-source win."""
    if not uri.token:
        raise InputError(f"{uri} names no token", rule="key URIs carry token=")
    if uri.type not in (None, "private"):
        raise InputError(f"{uri} is not a private key", rule="signing keys are type=private")
    if uri.pin_source:
        pin = SecretRef.parse(uri.pin_source)
    token = open_token(uri.module_path or module_path, uri.token, pin, softhsm2_conf)
    return token, token.signer(label=uri.object, key_id=uri.id, needed_by=needed_by or str(uri))


def forget_sessions() -> None:
    """Drop this process's token sessions and re-initialise every module it loaded, so the
    next :func:`open_token` sees the token directory afresh. For a worker retrying a start-up
    that failed transiently (SoftHSM2 can report NoSuchToken or GeneralError while other
    processes log in or after one was killed); never used while a session is in use."""
    _TOKENS.clear()
    for module_path in list(_LIB_CONF):
        try:
            pkcs11.lib(module_path).reinitialize()
        except (p11e.PKCS11Error, OSError, RuntimeError):
            _LIB_CONF.pop(module_path, None)  # load_module tries again from scratch
