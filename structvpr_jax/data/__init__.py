"""Data: layout, tfds builder, synthetic world, input pipeline."""
