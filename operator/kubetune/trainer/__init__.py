"""The trainer that runs inside every training pod: `python -m kubetune.trainer`.

It reads the TrainerConfig the operator rendered, fine-tunes (full or LoRA, one process or many
under torchrun), reports progress to stdout and to the FineTuneJob's status, checkpoints so a
preempted pod resumes, and exports a Hugging Face checkpoint plus a Triton model repository.
See docs/trainer.md. torch and transformers are imported only by the modules that need them, so
the package itself imports cheaply.
"""
