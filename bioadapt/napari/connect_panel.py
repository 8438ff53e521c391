"""Connect to a bioadapt service: server URL, token and workspace (what `bioadapt serve` prints), remembered for
the next session."""

from __future__ import annotations

from qtpy.QtWidgets import QFormLayout, QLineEdit, QPushButton, QWidget

from bioadapt.napari.session import Session
from bioadapt.napari.settings import Connection, load_connection, save_connection
from bioadapt.service.client import BioadaptClient, connect


class ConnectPanel(QWidget):
    def __init__(self, session: Session, parent: QWidget | None = None):
        super().__init__(parent)
        self.session = session
        remembered = load_connection()
        self.server_url = QLineEdit(remembered.server_url)
        self.token = QLineEdit(remembered.token)
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("the token `bioadapt serve` printed")
        self.workspace = QLineEdit(remembered.workspace)
        self.workspace.setPlaceholderText("the service's workspace, e.g. ws-user-bioadapt")
        self.connect_button = QPushButton("Connect")
        form = QFormLayout(self)
        form.addRow("Server", self.server_url)
        form.addRow("Token", self.token)
        form.addRow("Workspace", self.workspace)
        form.addRow(self.connect_button)
        self.connect_button.clicked.connect(self._clicked)
        session.connected.connect(self._show_state)

    def connection(self) -> Connection:
        return Connection(self.server_url.text().strip(), self.token.text().strip(), self.workspace.text().strip())

    def _clicked(self) -> None:
        if self.session.client is not None:
            self.session.set_client(None)
            self.session.say("disconnected")
            return
        connection = self.connection()
        self.connect_button.setEnabled(False)
        self.session.say(f"connecting to {connection.server_url} ...")
        worker = self.session.background.run(
            "connecting", lambda: connect(connection.server_url, connection.token or None,
                                          connection.workspace or None),
            lambda client: self._connected(connection, client))
        worker.finished.connect(lambda: self.connect_button.setEnabled(True))

    def _connected(self, connection: Connection, client: BioadaptClient) -> None:
        save_connection(connection)
        self.session.set_client(client)
        self.session.say(f"connected to {connection.server_url}")

    def _show_state(self, client: BioadaptClient | None) -> None:
        self.connect_button.setText("Disconnect" if client is not None else "Connect")
        for field in (self.server_url, self.token, self.workspace):
            field.setEnabled(client is None)
