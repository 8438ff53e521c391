"""Number fields and tables of the widget's forms, built one way everywhere."""

from __future__ import annotations

from collections.abc import Sequence

from qtpy.QtWidgets import QAbstractItemView, QDoubleSpinBox, QHeaderView, QSpinBox, QTableWidget


def int_field(minimum: int, maximum: int, value: int) -> QSpinBox:
    field = QSpinBox()
    field.setRange(minimum, maximum)
    field.setValue(value)
    return field


def optional_int_field(maximum: int, unset_text: str) -> QSpinBox:
    """A number field whose lowest value (0, shown as ``unset_text``) means 'not given'; ``given(field)`` reads it."""
    field = int_field(0, maximum, 0)
    field.setSpecialValueText(unset_text)
    return field


def optional_float_field(maximum: float, unset_text: str, decimals: int = 6, step: float = 1e-4) -> QDoubleSpinBox:
    field = float_field(0.0, maximum, 0.0, decimals, step)
    field.setSpecialValueText(unset_text)
    return field


def given(field: QSpinBox | QDoubleSpinBox) -> int | float | None:
    """The value of an optional field, None when it shows its 'not given' text."""
    return None if field.value() == field.minimum() else field.value()


def float_field(minimum: float, maximum: float, value: float, decimals: int = 6, step: float = 1e-4
                ) -> QDoubleSpinBox:
    field = QDoubleSpinBox()
    field.setDecimals(decimals)
    field.setRange(minimum, maximum)
    field.setSingleStep(step)
    field.setValue(value)
    return field


def read_only_table(columns: Sequence[str], selection: QAbstractItemView.SelectionMode,
                    stretch: str | None = None) -> QTableWidget:
    """A table of whole-row selections that cannot be edited; ``stretch`` names the column that takes the spare
    width (all columns share it when None)."""
    table = QTableWidget(0, len(columns))
    table.setHorizontalHeaderLabels(list(columns))
    table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    table.setSelectionMode(selection)
    table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
    table.verticalHeader().setVisible(False)
    header = table.horizontalHeader()
    if stretch is None:
        header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
    else:
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(list(columns).index(stretch), QHeaderView.ResizeMode.Stretch)
    return table
