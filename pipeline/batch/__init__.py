"""One production lot: plan (:mod:`.plan`), the orchestrator (:mod:`.orchestrator`), worker
processes that make keys, sign leaves and write bundles (:mod:`.worker`, :mod:`.custody`,
:mod:`.bundle`), the journal that makes it resumable (:mod:`.journal`), and the report
(:mod:`.report`)."""
