"""TensorBoard views of runs and comparisons: tag descriptions, HPARAMS sessions and experiments, the
custom-scalars layout, and summary protos written without TensorFlow."""
