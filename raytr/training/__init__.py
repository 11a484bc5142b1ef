"""Training: arguments, the per-worker loop, and the Trainer that runs it on Ray Train."""
