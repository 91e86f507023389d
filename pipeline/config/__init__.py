"""What a station is told: the batch manifest (:mod:`.manifest`), the station config
(:mod:`.station`), and the line-aware YAML loader both use (:mod:`.yamlfile`). Everything is
checked before any side effect, and every problem is reported as ``file:line: what (rule)``."""
