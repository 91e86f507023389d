"""The two limits a wrapped batch cannot beat, measured in the same run as the batch.

* ``hsm_ceiling``: what the HSM alone sustains. In as many processes as the batch has
  workers, each logged in as a worker is, per device: a session key pair, its wrap under
  the transport key, and the leaf certificate built and signed by the HSM-held issuer —
  the worker's HSM work exactly, with no file, no ledger, no journal, no audit log.
* ``disk_ceiling``: what the disk alone sustains. In as many processes, per device: the
  bundle files the worker renders and writes (the product's own bundle code, fed one
  certificate made beforehand, so no cryptography), with the worker's sync policy: the
  signing ledger marked and synced a window at a time, one filesystem sync per chunk.

Both are timed from a common start (every process logged in or set up first, then released
together) to the last process's end, so start-up cost is not counted: the batch's rate,
which does count it, is compared with them as it is.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from common import OUT, WORKERS, station

_SETUP_SECONDS = 300  # for every process to log in (or set up) before the clock starts
_ATTEMPTS = 5  # a transient HSM error at start-up is retried, as a batch worker does
T = TypeVar("T")


def _run_in_processes(target: Any, args: tuple[Any, ...], count: int) -> float:
    """``target(args, index, share, barrier)`` in WORKERS spawned processes; devices per second
    from the barrier's release to the last end."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS, timeout=_SETUP_SECONDS)
    spans = ctx.Queue()
    shares = [count // WORKERS + (1 if i < count % WORKERS else 0) for i in range(WORKERS)]
    processes = [
        ctx.Process(target=_report, args=(target, args, i, share, barrier, spans))
        for i, share in enumerate(shares)
    ]
    for process in processes:
        process.start()
    got: list[Any] = []
    while len(got) < len(processes):
        try:
            got.append(spans.get(timeout=1))
        except queue.Empty:  # a process that died without a word (killed, import failed)
            dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if dead:
                for process in processes:
                    process.kill()
                raise RuntimeError(f"a ceiling process died (exit {dead[0]})") from None
    for process in processes:
        process.join()
    failed = [span for span in got if isinstance(span, str)]
    if failed:
        raise RuntimeError(f"a ceiling process failed: {failed[0]}")
    return count / (max(end for _, end in got) - min(start for start, _ in got))


def _report(
    target: Any, args: tuple[Any, ...], index: int, share: int, barrier: Any, spans: Any
) -> None:
    try:
        spans.put(target(args, index, share, barrier))
    except BaseException as exc:  # the parent waits for one answer per process
        spans.put(f"{type(exc).__name__}: {exc}")
        barrier.abort()
        raise


def _retry(start: Callable[[], T]) -> T:
    """``start()``, retried like a batch worker's start-up: SoftHSM2 reports transient errors
    when several processes open the same token at once."""
    from pipeline.errors import HsmError

    for attempt in range(_ATTEMPTS):
        try:
            return start()
        except HsmError:
            if attempt == _ATTEMPTS - 1:
                raise
            time.sleep(0.25 * 2**attempt)
    raise AssertionError("unreachable")


def _hsm_worker(args: tuple[str, str], index: int, share: int, barrier: Any) -> tuple[float, float]:
    conf, station_path = args
    os.environ["SOFTHSM2_CONF"] = conf
    from pipeline.batch.custody import key_maker
    from pipeline.batch.signing import open_station_keys
    from pipeline.ca.builders import build_leaf, random_serial
    from pipeline.config.station import load_station
    from pipeline.keyprofile import KeyProfile

    st = load_station(Path(station_path))
    keys = _retry(lambda: open_station_keys(st))
    maker = key_maker(st.custody, keys.token, KeyProfile.EC_P256, None)
    barrier.wait()
    start = time.time()
    for n in range(share):
        rid = f"hsm-{index}-{n:07d}"
        key = maker.make(rid, False)
        build_leaf(key.public, rid, keys.issuer, serial=random_serial(), validity_days=365)
    return start, time.time()


def hsm_ceiling(ca_dir: Path, count: int) -> float:
    """Devices per second of the worker's HSM work alone (module docstring)."""
    path = station("wrapped", ca_dir)
    return _run_in_processes(_hsm_worker, (os.environ["SOFTHSM2_CONF"], str(path)), count)


def _disk_worker(
    args: tuple[str, str, bytes, bytes, bytes], index: int, share: int, barrier: Any
) -> tuple[float, float]:
    out, batch_id, cert_pem, chain_pem, blob = args
    from cryptography import x509

    from pipeline.batch.bundle import BundleDirectory, render_bundle
    from pipeline.batch.ledger import WINDOW, LedgerWriter
    from pipeline.batch.records import KeyReference
    from pipeline.config.station import default_chunk_size
    from pipeline.files import sync_filesystem
    from pipeline.layout import WRAPPED_KEY
    from pipeline.vocabulary import Custody

    batch_dir = Path(out)
    cert = x509.load_pem_x509_certificate(cert_pem)
    reference = KeyReference(Custody.WRAPPED, file=WRAPPED_KEY, format="bench")
    ledger = LedgerWriter(batch_dir)
    directory = BundleDirectory(batch_dir)
    chunk = default_chunk_size(Custody.WRAPPED)  # the batch's: one filesystem sync per chunk
    barrier.wait()
    start = time.time()
    for n in range(share):
        if n % WINDOW == 0:
            ledger.mark(f"{index:X}{m:07X}" for m in range(n, min(share, n + WINDOW)))
        rid = f"disk-{index}-{n:07d}"
        bundle = render_bundle(
            batch_id=batch_id,
            registration_id=rid,
            device_id=rid,
            cert=cert,
            chain_pem=chain_pem,
            private_files={WRAPPED_KEY: blob},
            key=reference,
            extra={"tags": {}, "desired": {}},
        )
        directory.store(bundle)
        if n % chunk == chunk - 1 or n == share - 1:
            sync_filesystem(batch_dir)
    return start, time.time()


def disk_ceiling(ca_dir: Path, count: int) -> float:
    """Devices per second of the worker's file work alone (module docstring). The files stay
    until bench-out/ is removed: deleting them now would slow what is measured next."""
    from pipeline import ca
    from pipeline.keyprofile import KeyProfile

    key = KeyProfile.EC_P256.generate_software_key()
    root = ca.build_root(key, ca.parse_name("CN=Disk Ceiling"), 365)
    issuer = ca.Issuer(root, key, ca.pem(root))
    leaf = ca.build_leaf(
        KeyProfile.EC_P256.generate_software_key().public_key(),
        "disk-ceiling",
        issuer,
        serial=ca.random_serial(),
        validity_days=365,
    )
    chain_pem = (ca_dir / "chain.pem").read_bytes()
    batch_dir = OUT / f"disk-ceiling-{count}-{time.time_ns()}"
    batch_dir.mkdir(parents=True)
    blob = os.urandom(152)  # the size of a wrapped P-256 PKCS#8 key
    args = (str(batch_dir), batch_dir.name, ca.pem(leaf), chain_pem, blob)
    return _run_in_processes(_disk_worker, args, count)
