"""``provline emulator serve``: the local DPS + IoT Hub emulator (docs/emulator.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import InputError
from .app import emulator_app


@emulator_app.command("serve")
def emulator_serve(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="State, keys, TLS, emulator.json.")],
    host: Annotated[
        str | None,
        typer.Option(
            "--host", help="DPS address (device endpoint, service API); default 127.0.0.1."
        ),
    ] = None,
    hub_host: Annotated[
        str | None,
        typer.Option(
            "--hub-host", help="IoT Hub address (what assignedHub names); default: --host."
        ),
    ] = None,
    standard_ports: Annotated[
        bool | None,
        typer.Option(
            "--standard-ports",
            help="HTTPS and MQTT over WebSockets on 443, MQTT on 8883, as the device SDKs "
            "require (use a private address per emulator: docs/emulator.md).",
        ),
    ] = None,
    port: Annotated[
        int | None, typer.Option("--port", help="DPS device endpoint; 0 = free.")
    ] = None,
    service_port: Annotated[int | None, typer.Option("--service-port")] = None,
    hub_port: Annotated[int | None, typer.Option("--hub-port")] = None,
    mqtt_port: Annotated[int | None, typer.Option("--mqtt-port", help="MQTT; 0 = free.")] = None,
    id_scope: Annotated[str | None, typer.Option("--id-scope")] = None,
    operations_per_minute: Annotated[int | None, typer.Option("--operations-per-minute")] = None,
    registrations_per_minute: Annotated[
        int | None, typer.Option("--registrations-per-minute")
    ] = None,
    assign_seconds: Annotated[
        float | None,
        typer.Option("--assign-seconds", help="How long a registration stays 'assigning'."),
    ] = None,
    error_rate: Annotated[
        float | None, typer.Option("--error-rate", help="Probability of an injected 500/503.")
    ] = None,
    drop_rate: Annotated[
        float | None, typer.Option("--drop-rate", help="Probability of dropping the connection.")
    ] = None,
    latency_ms: Annotated[float | None, typer.Option("--latency-ms")] = None,
) -> None:
    """Run the emulator in the foreground until SIGINT/SIGTERM. Settings also come from
    DATA_DIR/config.json; faults can be changed live in DATA_DIR/faults.json."""
    from ..emulator import ListenError, serve_forever  # only this command loads the emulator

    overrides = {
        "host": host,
        "hub_host": hub_host,
        "standard_ports": standard_ports,
        "port": port,
        "service_port": service_port,
        "hub_port": hub_port,
        "mqtt_port": mqtt_port,
        "id_scope": id_scope,
        "operations_per_minute": operations_per_minute,
        "registrations_per_minute": registrations_per_minute,
        "assign_seconds": assign_seconds,
        "error_rate": error_rate,
        "drop_rate": drop_rate,
        "latency_ms": latency_ms,
    }
    try:
        serve_forever(data_dir, overrides)
    except ListenError as exc:
        raise InputError(str(exc.strerror), rule="emulator listeners") from exc
    except ValueError as exc:
        raise InputError(
            str(exc), where=str(data_dir / "config.json"), rule="emulator settings"
        ) from exc
