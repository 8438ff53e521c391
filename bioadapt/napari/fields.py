"""Number fields of the widget's forms, built one way everywhere."""

from __future__ import annotations

from qtpy.QtWidgets import QDoubleSpinBox, QSpinBox


def int_field(minimum: int, maximum: int, value: int) -> QSpinBox:
    field = QSpinBox()
    field.setRange(minimum, maximum)
    field.setValue(value)
    return field


def float_field(minimum: float, maximum: float, value: float, decimals: int = 6, step: float = 1e-4
                ) -> QDoubleSpinBox:
    field = QDoubleSpinBox()
    field.setDecimals(decimals)
    field.setRange(minimum, maximum)
    field.setSingleStep(step)
    field.setValue(value)
    return field
