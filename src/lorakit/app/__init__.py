"""The app above the core: CLI, training, data, evaluation, model loading."""
