"""The learner: algorithms (pure tensor losses) and the training loop."""
