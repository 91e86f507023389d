"""After the factory: what happens to identities once their batch is sealed (:mod:`.crl`)."""
