"""Training the built-in tiny CLIP on synthetic scenes (``python -m clipbatch.training.train_tiny``)."""
