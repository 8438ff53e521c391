"""The project's learning curve as a small plot: held-out score against training labels, one segment per fine-tune
from its parent's score to its own (both on the held-out patches of that moment), coloured by the verdict."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import QToolTip, QWidget

COLOURS = {"better": "#2e9e44", "same": "#7f7f7f", "worse": "#d33c32", "undecided": "#b0b0b0"}
MARGIN = 28


class LearningCurvePlot(QWidget):
    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.rows: list[dict[str, Any]] = []
        self.setMinimumHeight(120)
        self.setMouseTracking(True)
        self.setToolTip("held-out score against training labels: each fine-tune from its parent's score to its own")

    def set_rows(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rows of get_project's ``learning_curve``; those without both scores are left out."""
        self.rows = [dict(r) for r in rows if r.get("score") is not None and r.get("parent_score") is not None]
        self.update()

    def points(self) -> list[tuple[dict[str, Any], QPointF]]:
        """Each row with where its version's point is drawn (what a test or a tooltip reads)."""
        return [(row, self._at(row["labels"], row["score"])) for row in self.rows]

    def _frame(self) -> QRectF:
        return QRectF(MARGIN, 8, max(1, self.width() - MARGIN - 8), max(1, self.height() - MARGIN - 8))

    def _at(self, labels: float, score: float) -> QPointF:
        frame = self._frame()
        most = max([1] + [max(r["labels"], r["parent_labels"]) for r in self.rows])
        return QPointF(frame.left() + frame.width() * labels / most, frame.bottom() - frame.height() * score)

    def paintEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        frame = self._frame()
        painter.setPen(QPen(QColor("#888888")))
        painter.drawRect(frame)
        metric = next((r.get("metric") for r in self.rows if r.get("metric")), "score")
        painter.drawText(QRectF(frame.left(), frame.bottom() + 4, frame.width(), 16),
                         Qt.AlignmentFlag.AlignCenter, f"training labels  (y: held-out {metric}, 0 to 1)")
        if not self.rows:
            painter.drawText(frame, Qt.AlignmentFlag.AlignCenter, "no fine-tuned version yet")
            return
        for row, point in self.points():
            colour = QColor(COLOURS.get(row["verdict"], COLOURS["undecided"]))
            painter.setPen(QPen(colour, 2))
            start = self._at(row["parent_labels"], row["parent_score"])
            painter.drawLine(start, point)
            painter.setBrush(colour)
            painter.drawEllipse(point, 4, 4)
            painter.drawText(point + QPointF(6, -6), f"v{row['version']}")

    def mouseMoveEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        position = event.position() if hasattr(event, "position") else QPointF(event.pos())
        for row, point in self.points():
            if (point - position).manhattanLength() < 10:
                QToolTip.showText(event.globalPosition().toPoint() if hasattr(event, "globalPosition")
                                  else event.globalPos(), f"v{row['version']} ({row['verdict']}): {row['reason']}",
                                  self)
                return
        QToolTip.hideText()
