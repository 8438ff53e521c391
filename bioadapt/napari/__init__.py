"""The napari dock widget, a client of the service: filled by the clients issue."""
