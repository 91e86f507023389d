"""A local, faithful stand-in for Azure IoT Hub DPS and IoT Hub (docs/emulator.md).

For demos, tests and factory-CI dry runs. Nothing on the product path imports this package;
the product talks to it over HTTPS exactly as it talks to Azure.
"""

from __future__ import annotations

import json
import signal
import threading
from dataclasses import fields
from pathlib import Path
from typing import Any

from .app import Emulator
from .base import Config
from .server import Faults, ListenError

__all__ = ["Config", "Emulator", "Faults", "ListenError", "serve_forever"]


def load_config(data_dir: Path, overrides: dict[str, Any]) -> tuple[Config, Faults]:
    """``<data-dir>/config.json`` (emulator settings and faults), then command-line values."""
    values: dict[str, Any] = {}
    path = data_dir / "config.json"
    if path.exists():
        values.update(json.loads(path.read_text()))
    values.update({k: v for k, v in overrides.items() if v is not None})
    config_keys = {f.name for f in fields(Config)}
    fault_keys = {f.name for f in fields(Faults)}
    unknown = set(values) - config_keys - fault_keys
    if unknown:
        raise ValueError(f"unknown emulator settings: {', '.join(sorted(unknown))}")
    return (
        Config(**{k: v for k, v in values.items() if k in config_keys}),
        Faults(**{k: v for k, v in values.items() if k in fault_keys}),
    )


def serve_forever(data_dir: Path, overrides: dict[str, Any]) -> None:
    config, faults = load_config(data_dir, overrides)
    emulator = Emulator(data_dir, config, faults)
    info = emulator.start()  # ListenError (an OSError) when an address or port is unusable
    print(
        json.dumps({k: v for k, v in info.items() if "connection_string" not in k}, indent=2),
        flush=True,
    )
    print(f"emulator running; connection strings in {data_dir / 'emulator.json'}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    emulator.stop()
