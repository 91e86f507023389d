"""The one place where python-pkcs11's exceptions become provline's own (pipeline.errors).

Every PKCS#11 call a user can get wrong goes through :func:`call` or :func:`translate`, so
each failure is one line that names the operation (``sign``, ``wrap a device key``), the
mechanism by its ``CKM_`` name and number (also where python-pkcs11 has no name for it), the
PKCS#11 return value by its ``CKR_`` name, and, where the caller knows it, what needs the
operation (a custody policy, a key profile, a CA key).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import pkcs11.exceptions as p11e

from ..errors import HsmError, MechanismUnsupported, PinError
from .names import mechanism_name, return_value_name

_OPERATIONS = {
    "sign": "sign",
    "generate_keypair": "generate a key pair",
    "generate_key": "generate a key",
    "wrap_key": "wrap a key",
    "unwrap_key": "unwrap a key",
    "get_objects": "list objects",
    "get_attributes": "read attributes",
    "__getitem__": "read an attribute",
    "__setitem__": "set an attribute",
    "destroy": "destroy an object",
    "create_object": "create an object",
    "encrypt": "encrypt",
}

_TEMPLATE = (
    p11e.AttributeTypeInvalid,
    p11e.AttributeValueInvalid,
    p11e.AttributeReadOnly,
    p11e.TemplateInconsistent,
    p11e.TemplateIncomplete,
)
_GONE = (
    p11e.DeviceRemoved,
    p11e.TokenNotPresent,
    p11e.SessionClosed,
    p11e.SessionHandleInvalid,
    p11e.DeviceError,
)
_FULL = (p11e.DeviceMemory,)


def operation_name(fn: Any) -> str:
    name = getattr(fn, "__name__", "")
    return _OPERATIONS.get(name, name.replace("_", " ") or "PKCS#11 call")


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call python-pkcs11, turning its errors into our hierarchy (operation from ``fn``)."""
    with translate(operation_name(fn), kwargs.get("mechanism")):
        return fn(*args, **kwargs)


@contextmanager
def translate(
    operation: str, mechanism: Any = None, needed_by: str = "", where: str = ""
) -> Iterator[None]:
    """Map any python-pkcs11 error raised inside the block to one provline error line."""
    try:
        yield
    except p11e.PKCS11Error as exc:
        raise_mapped(exc, operation, mechanism, needed_by, where)


def raise_mapped(
    exc: p11e.PKCS11Error,
    operation: str,
    mechanism: Any = None,
    needed_by: str = "",
    where: str = "",
) -> NoReturn:
    ckr = return_value_name(exc)
    with_mech = f" with {mechanism_name(mechanism)}" if mechanism is not None else ""
    need = f"; needed by {needed_by}" if needed_by else ""
    if isinstance(exc, p11e.MechanismInvalid):
        raise MechanismUnsupported(
            f"{operation}{with_mech}: the token does not offer this mechanism ({ckr}){need}",
            where=where,
            rule="mechanisms the token offers: see `provline hsm check`",
        ) from exc
    if isinstance(exc, p11e.MechanismParamInvalid):
        raise MechanismUnsupported(
            f"{operation}{with_mech}: the token rejects the mechanism's parameters ({ckr}){need}",
            where=where,
            rule="mechanisms the token offers: see `provline hsm check`",
        ) from exc
    if isinstance(exc, (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.PinLenRange)):
        raise PinError(f"PIN rejected by the token ({ckr})", where=where, rule="user PIN") from exc
    if isinstance(exc, _TEMPLATE):
        raise HsmError(
            f"{operation}{with_mech}: the token rejects an attribute of the template ({ckr}){need}",
            where=where,
            rule="attributes the token supports: see docs/hsm.md",
        ) from exc
    if isinstance(exc, _FULL) or "TOKEN_RESOURCE_EXCEEDED" in ckr:
        raise HsmError(
            f"{operation}: the token has no room for more objects ({ckr}){need}",
            where=where,
            rule="token capacity: hsm.max_objects, `provline plan`",
        ) from exc
    if isinstance(exc, _GONE):
        raise HsmError(
            f"{operation}: the token went away ({ckr})",
            where=where,
            rule="the HSM stays connected for the run; run again to resume",
        ) from exc
    raise HsmError(f"{operation}{with_mech} failed ({ckr}){need}", where=where) from exc
