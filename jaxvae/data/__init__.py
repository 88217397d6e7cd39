"""Data loading internals; the public entry point is `jaxvae.input_pipeline`."""
