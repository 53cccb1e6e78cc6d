"""ControlNet: preprocessors (annotators), ControlNet model files, and applying units to a pipeline."""
