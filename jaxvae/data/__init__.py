"""Data loading internals; the public entry point is `jaxvae.input_pipeline`.

Modules, one job each:
  errors      the exceptions users see (missing / corrupt dataset files)
  files       offline source files: expected names, IDX / size validation
  tf_support  guarded TensorFlow import (TF never takes an accelerator) and TF image ops
  prepare     tfds builder preparation (prepared -> manual_dir -> download) and split loading
  transforms  uint8 -> float32 images: dynamic binarization and pixel scaling (NumPy)
  memory      in-memory NumPy train iterator and eval batches (small datasets)
  streaming   tf.data train iterator and eval batches (large datasets)
"""
