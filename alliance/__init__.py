"""Alliance: federated learning across organisations.

The engine package. It imports neither kopf nor kubernetes: the Kubernetes operator
(``operator/``) and the embedded runner (``alliance.embedded``) both drive it.
"""

__version__ = "0.1.0"
