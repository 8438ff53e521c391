"""One interface over bioimage.io and Cellpose models: filled by the adapters issues."""
