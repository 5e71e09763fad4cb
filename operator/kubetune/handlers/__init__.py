"""Thin kopf handlers: parse -> build -> apply -> status. Importing this package registers them."""

from kubetune.handlers import finetunejob, lifecycle, liveness, memory, modelserver

__all__ = ["finetunejob", "lifecycle", "liveness", "memory", "modelserver"]
