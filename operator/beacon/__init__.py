"""beacon: health-checked service discovery and layered configuration for Kubernetes, as a kopf operator.

The package is split into rooms that mirror the flow of data (see README "Architecture"): thin kopf handlers,
pure models and reconcile functions, one async prober, and one module that writes to the Kubernetes API.
The development tooling (a local control plane and network-namespace test hosts) lives beside them because the
tests and `make run` share it.
"""

__version__ = "0.1.0"
