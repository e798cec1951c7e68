"""Admin HTTP API, web console and ``/metrics`` (FastAPI), served by ``omnimri-node serve``.

Public API::

    from dicom_node.admin import AdminServer, create_app
    server = AdminServer(settings, config_path=path); server.start(); ...; server.stop()
"""

from dicom_node.admin.app import create_app
from dicom_node.admin.backend import AdminBackend, AdminError
from dicom_node.admin.server import AdminServer

__all__ = ["AdminBackend", "AdminError", "AdminServer", "create_app"]
