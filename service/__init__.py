"""dapo-inspect serving package: reads an artifact folder, never imports `training/`."""
__version__ = "0.1.0"
