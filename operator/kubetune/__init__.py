"""kubetune: fine-tune and serve models on Kubernetes GPU clusters."""

__version__ = "0.1.0"
