"""UNet-family segmentation of breast ultrasound, with Ray Data / Ray Train / batch inference jobs."""

__version__ = "0.1.0"
