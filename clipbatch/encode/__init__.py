"""Stage 3: batched encoding of images and captions with a model family's backend."""
