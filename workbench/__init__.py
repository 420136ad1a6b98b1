"""workbench: a research workbench for semi-supervised semantic segmentation."""
__version__ = "0.1.0"
