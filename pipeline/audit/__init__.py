"""The batch record an auditor trusts: the hash-chained, CMS-sealed log that a run writes
(:mod:`.log`) and its offline verification (:mod:`.verify`)."""
