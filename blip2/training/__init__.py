"""Training machinery shared by the stage-1, stage-2 and instruction-tuning jobs (no Ray here)."""
