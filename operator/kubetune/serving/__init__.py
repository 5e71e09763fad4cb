"""Serving: the Triton python-backend model, the model-repository writer and local tooling.

Nothing here is imported by the operator's reconcile path except `smoketest` (plain HTTP through
tritonclient) and `repository` (file I/O only). `triton_model` runs INSIDE Triton's python backend
and is the only module that imports torch; it is never imported by the operator, only copied into
model repositories as `model.py`.
"""
