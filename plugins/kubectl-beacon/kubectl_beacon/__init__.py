"""kubectl-beacon: `kubectl beacon status|registry|config|drain|undrain`, the day-2 view of beacon.

Why it exists: what beacon knows is spread over ServiceEntry and ConfigEntry status, EndpointSlices, the registry
ConfigMaps and ControllerRevisions. The plugin reads only those (what beacon publishes, with the user's own
kubeconfig and rights) and writes only what the APIs define for people to write: the `beacon.dev/drain`
annotations and a ConfigEntry's `spec.rollbackTo`. It never imports the operator, so it installs on its own.
"""
