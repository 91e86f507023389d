"""The one place where python-pkcs11's exceptions become provline's own (pipeline.errors):
every PKCS#11 call that a user can get wrong goes through :func:`call`."""

from __future__ import annotations

from typing import Any

import pkcs11.exceptions as p11e

from ..errors import HsmError, MechanismUnsupported, PinError


def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call python-pkcs11, turning the errors a user can act on into our hierarchy."""
    try:
        return fn(*args, **kwargs)
    except p11e.MechanismInvalid as exc:
        raise MechanismUnsupported(
            f"the token does not support the mechanism {kwargs.get('mechanism', '')}",
            rule="mechanism supported by the token",
        ) from exc
    except (p11e.PinIncorrect, p11e.PinLocked, p11e.PinExpired, p11e.PinLenRange) as exc:
        raise PinError(f"PIN rejected by the token: {type(exc).__name__}", rule="user PIN") from exc
    except p11e.PKCS11Error as exc:
        raise HsmError(f"PKCS#11 call failed: {type(exc).__name__} {exc}".strip()) from exc
