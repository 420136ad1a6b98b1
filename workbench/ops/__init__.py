"""Tensor operations of the methods (the bottom layer: nothing here imports the rest of the package).

:data:`IGNORE` is the one definition of the label value that marks a pixel without a label (padding, void, an
unconfident pseudo-label); every module of the package takes it from here.
"""

IGNORE = 255
"""Label value of a pixel that no loss or metric counts (Pascal VOC's void label, used by every dataset here)."""
