"""The local Kubernetes control plane that beacon's tests and `make run` stand on (see cluster.py)."""

from beacon_dev.devcluster.binaries import BinariesMissingError, find_bin_dir
from beacon_dev.devcluster.cluster import ControlPlaneError, DevCluster, Ports

__all__ = ["BinariesMissingError", "ControlPlaneError", "DevCluster", "Ports", "find_bin_dir"]
