"""After the factory: what happens to identities once their batch is sealed
(docs/lifecycle.md) — the station inventory (:mod:`.inventory`), the station lifecycle log
(:mod:`.log`), journaled operations (:mod:`.operation`), cumulative CRLs (:mod:`.crl`),
:mod:`.revoke`, :mod:`.renew`, :mod:`.promote`, :mod:`.reconcile`, :mod:`.rebuild`, and DPS / IoT
Hub calls paced like registration (:mod:`.service`, :mod:`.hub`, :mod:`.enrollments`)."""
