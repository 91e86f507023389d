"""provline: factory-line provisioning of IoT device identities.

The library is usable without the CLI: :func:`pipeline.run.run_batch` runs a batch.
"""

__version__ = "0.1.0"
