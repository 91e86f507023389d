"""``CK_TOKEN_INFO`` in full: PIN length limits and memory figures.

python-pkcs11 0.10.1 keeps only the label, manufacturer, model, serial and flags of
``C_GetTokenInfo``; provline also needs ``ulMinPinLen``/``ulMaxPinLen`` (to say why a PIN is
refused) and ``ulTotal/FreePublic/PrivateMemory`` (to tell whether a retain batch fits). So
this module calls ``C_GetTokenInfo`` itself through the module's ``CK_FUNCTION_LIST``
(PKCS#11 v2.40 base specification, section 5.4 "Slot and token management functions";
structure layout in section 3.2). The module is the one python-pkcs11 already loaded and
initialised in this process (the same ``dlopen`` handle), so no second ``C_Initialize`` is
made. The layout is the Unix one (no structure packing), which is what every module on Linux
uses.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

CK_UNAVAILABLE_INFORMATION = ctypes.c_ulong(-1).value
CK_EFFECTIVELY_INFINITE = 0
_C_GET_TOKEN_INFO = 6  # index in CK_FUNCTION_LIST after the version field


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _TokenInfo(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", ctypes.c_ulong),
        ("ulMaxSessionCount", ctypes.c_ulong),
        ("ulSessionCount", ctypes.c_ulong),
        ("ulMaxRwSessionCount", ctypes.c_ulong),
        ("ulRwSessionCount", ctypes.c_ulong),
        ("ulMaxPinLen", ctypes.c_ulong),
        ("ulMinPinLen", ctypes.c_ulong),
        ("ulTotalPublicMemory", ctypes.c_ulong),
        ("ulFreePublicMemory", ctypes.c_ulong),
        ("ulTotalPrivateMemory", ctypes.c_ulong),
        ("ulFreePrivateMemory", ctypes.c_ulong),
        ("hardwareVersion", _Version),
        ("firmwareVersion", _Version),
        ("utcTime", ctypes.c_char * 16),
    ]


@dataclass(frozen=True)
class TokenFigures:
    """The numeric part of CK_TOKEN_INFO; ``None`` where the token says
    CK_UNAVAILABLE_INFORMATION."""

    min_pin: int | None
    max_pin: int | None
    total_public_memory: int | None
    free_public_memory: int | None
    total_private_memory: int | None
    free_private_memory: int | None

    def to_json(self) -> dict[str, int | None]:
        return {k: v for k, v in self.__dict__.items()}


def _value(raw: int) -> int | None:
    return None if raw == CK_UNAVAILABLE_INFORMATION else raw


def token_figures(module_path: str, slot_id: int) -> TokenFigures | None:
    """CK_TOKEN_INFO's numbers for ``slot_id``, or ``None`` if the module will not say."""
    try:
        lib = ctypes.CDLL(module_path)
        function_list = ctypes.c_void_p()
        if lib.C_GetFunctionList(ctypes.byref(function_list)) != 0 or not function_list.value:
            return None
        pointer_size = ctypes.sizeof(ctypes.c_void_p)
        table = ctypes.cast(function_list.value + pointer_size, ctypes.POINTER(ctypes.c_void_p))
        prototype = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(_TokenInfo))
        get_token_info: Any = prototype(table[_C_GET_TOKEN_INFO])
        info = _TokenInfo()
        if get_token_info(slot_id, ctypes.byref(info)) != 0:
            return None
    except (OSError, AttributeError, ValueError):
        return None
    return TokenFigures(
        min_pin=_value(info.ulMinPinLen),
        max_pin=_value(info.ulMaxPinLen),
        total_public_memory=_value(info.ulTotalPublicMemory),
        free_public_memory=_value(info.ulFreePublicMemory),
        total_private_memory=_value(info.ulTotalPrivateMemory),
        free_private_memory=_value(info.ulFreePrivateMemory),
    )
