"""bioadapt: adapt pre-trained bioimage models to new images with active learning."""
__version__ = "0.1.0"
