"""The typed API of kubetune's custom resources: the single source of truth for the CRDs."""
