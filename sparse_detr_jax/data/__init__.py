"""Input pipeline: sources (COCO directory, TFDS, generated shapes), the official DETR transforms,
bucketed static-shape batches and grain loaders. See `pipeline.py` for the entry points."""
