"""Stage 2: decode image bytes and do the per-image part of the model's preprocessing."""
