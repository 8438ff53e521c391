"""The napari dock widget, a pure client of the bioadapt service (``bioadapt.service.client``).

Modules, one job each: ``settings`` (the remembered connection) and ``layers`` (a patch as napari layers) need
neither napari nor Qt; ``background`` (calls off the GUI thread), ``session`` (what the panels share), the panels
(``connect_panel``, ``project_panel``, ``score_panel``, ``patch_panel``, ``tune_panel``, ``versions_panel``),
``shortcuts`` and ``widget`` (the dock widget napari opens, declared in ``napari.yaml``) need Qt; only ``widget``
imports napari. Nothing is imported here, so ``import bioadapt.napari`` works without napari.
"""
