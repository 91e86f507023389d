"""Registration with Azure IoT Hub DPS and IoT Hub: where the services are
(:mod:`.endpoints`), the DPS service API (:mod:`.service`), IoT Hub identities (:mod:`.hub`),
the device side (:mod:`.device`), pacing and retries (:mod:`.pacing`), the chain pre-flight
(:mod:`.preflight`) and the stage that registers a batch (:mod:`.stage`)."""
