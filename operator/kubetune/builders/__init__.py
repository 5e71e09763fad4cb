"""Pure functions: a typed resource (+ settings) -> child manifests as dicts. No I/O."""
