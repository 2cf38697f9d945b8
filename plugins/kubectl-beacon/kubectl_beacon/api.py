"""The plugin's only door to the Kubernetes API: a few blocking JSON requests over the kubernetes client.

Why it exists: the commands want plain dicts (what `kubectl get -o json` shows) and a handful of verbs: get, list
by label, and merge patch. The kubernetes client brings the kubeconfig handling (contexts, exec plugins, tokens,
client certificates); raw requests through it keep the objects as the API sends them, with no model classes in
between. A plugin is a short-lived command, so blocking calls are what it wants.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

Obj = dict[str, Any]

GROUP_VERSION = "beacon.dev/v1alpha1"
FIELD_MANAGER = "kubectl-beacon"
REQUEST_SECONDS = 30  # who wrote a drain annotation or a rollbackTo, as managedFields tell it
# kind -> (API prefix, plural)
RESOURCES: dict[str, tuple[str, str]] = {
    "ServiceEntry": (f"/apis/{GROUP_VERSION}", "serviceentries"),
    "ConfigEntry": (f"/apis/{GROUP_VERSION}", "configentries"),
    "EndpointSlice": ("/apis/discovery.k8s.io/v1", "endpointslices"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Pod": ("/api/v1", "pods"),
    "ControllerRevision": ("/apis/apps/v1", "controllerrevisions"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "DaemonSet": ("/apis/apps/v1", "daemonsets"),
}


class ApiError(Exception):
    """A request the API server refused (status >= 400), with its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class Api:
    """Blocking JSON requests with the credentials of a kubeconfig context."""

    def __init__(self, api: k8s.ApiClient, *, namespace: str) -> None:
        self._api = api
        self.namespace = namespace  # the context's namespace, else "default": what `-n` defaults to

    @classmethod
    def from_kubeconfig(cls, *, kubeconfig: str | None, context: str | None) -> Api:
        """The client of `context` (default: the current one) in `kubeconfig` (default: $KUBECONFIG or
        ~/.kube/config), as kubectl would pick it."""
        configuration = k8s.Configuration()
        k8s_config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
        contexts, current = k8s_config.list_kube_config_contexts(config_file=kubeconfig)
        chosen = next((c for c in contexts if c.get("name") == context), current) if context else current
        namespace = str(((chosen or {}).get("context") or {}).get("namespace") or "default")
        return cls(k8s.ApiClient(configuration), namespace=namespace)

    def close(self) -> None:
        self._api.close()

    @staticmethod
    def path(kind: str, namespace: str, name: str | None = None) -> str:
        prefix, plural = RESOURCES[kind]
        return f"{prefix}/namespaces/{namespace}/{plural}" + (f"/{name}" if name else "")

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> Obj:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        _, url, with_auth, _, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query),
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        # the client serialises a JSON body itself (a string would be sent as a JSON string)
        response = self._api.call_api(method, url, header_params=with_auth, body=body, _request_timeout=REQUEST_SECONDS)
        raw = response.read()
        if response.status >= 400:
            try:
                message = str(json.loads(raw).get("message") or raw)
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
            raise ApiError(int(response.status), message)
        result: Obj = json.loads(raw) if raw else {}
        return result

    def get(self, kind: str, namespace: str, name: str) -> Obj | None:
        """The object, or None when there is none of that name."""
        try:
            return self.request("GET", self.path(kind, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, *, label_selector: str | None = None) -> list[Obj]:
        query = [("labelSelector", label_selector)] if label_selector else []
        items: list[Obj] = self.request("GET", self.path(kind, namespace), query=query).get("items") or []
        return items

    def merge_patch(self, kind: str, namespace: str, name: str, patch: Obj) -> Obj:
        """A JSON merge patch. With `metadata.resourceVersion` in `patch`, the API refuses it (409) if the object
        changed meanwhile: a read-modify-write that never loses someone else's edit."""
        return self.request(
            "PATCH",
            self.path(kind, namespace, name),
            query=[("fieldManager", FIELD_MANAGER)],
            body=patch,
            content_type="application/merge-patch+json",
        )
