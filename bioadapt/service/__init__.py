"""The bioadapt service: projects, images, patches, labels, model versions and jobs kept in a store
(SQLite or any SQLAlchemy URL) and Zarr; scoring, fine-tuning, evaluation, prediction and export run on Ray;
everything is offered as one Hypha service (``bioadapt serve``) that napari, the browser page (``web/``, served by
the service itself) and Python scripts (``bioadapt.service.client.connect``) call."""
