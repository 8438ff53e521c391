"""bioimage.io package export of fine-tuned models: filled by the exporters issue."""
