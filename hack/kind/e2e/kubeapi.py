"""A minimal Kubernetes API client for the kind e2e helpers (hack/kind-e2e.sh).

The kubernetes package only loads the kubeconfig (host, CA, client certificate or token); the requests are plain
urllib3, so the helpers behave the same with every version of the generated client, and a watch yields each
event together with the moment its line arrived (time.monotonic()), before any decoding into models.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client, config


class Kube:
    def __init__(self, kubeconfig: str, context: str | None = None) -> None:
        cfg = client.Configuration()
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=cfg, persist_config=False
        )
        self.host = cfg.host.rstrip("/")
        self.headers = {"Accept": "application/json"}
        token = cfg.api_key.get("BearerToken") or cfg.api_key.get("authorization")
        if token:
            self.headers["Authorization"] = token if " " in token else f"Bearer {token}"
        tls: dict[str, Any] = {}
        if cfg.verify_ssl:
            tls["cert_reqs"] = "CERT_REQUIRED"
            if cfg.ssl_ca_cert:
                tls["ca_certs"] = cfg.ssl_ca_cert
        else:
            tls["cert_reqs"] = "CERT_NONE"
        if cfg.cert_file:
            tls["cert_file"] = cfg.cert_file
        if cfg.key_file:
            tls["key_file"] = cfg.key_file
        self.http = urllib3.PoolManager(num_pools=4, maxsize=4, **tls)

    def _url(self, path: str, **query: Any) -> str:
        q = {k: v for k, v in query.items() if v is not None}
        return self.host + path + ("?" + urllib.parse.urlencode(q) if q else "")

    def get(self, path: str, **query: Any) -> dict[str, Any]:
        resp = self.http.request("GET", self._url(path, **query), headers=self.headers, timeout=30.0)
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: HTTP {resp.status}: {resp.data[:300]!r}")
        result: dict[str, Any] = json.loads(resp.data)
        return result

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {**self.headers, "Content-Type": "application/merge-patch+json"}
        resp = self.http.request("PATCH", self._url(path), body=json.dumps(body), headers=headers, timeout=30.0)
        if resp.status != 200:
            raise RuntimeError(f"PATCH {path}: HTTP {resp.status}: {resp.data[:300]!r}")
        result: dict[str, Any] = json.loads(resp.data)
        return result

    def watch(
        self, path: str, resource_version: str, seconds: int = 60, **query: Any
    ) -> Iterator[tuple[float, dict[str, Any]]]:
        """(arrival, event) for each watch event; ends when the server closes the watch after `seconds`."""
        url = self._url(
            path,
            watch="true",
            resourceVersion=resource_version,
            timeoutSeconds=seconds,
            allowWatchBookmarks="true",
            **query,
        )
        resp = self.http.request(
            "GET",
            url,
            headers=self.headers,
            preload_content=False,
            timeout=urllib3.Timeout(connect=10, read=seconds + 30),
        )
        try:
            if resp.status != 200:
                raise RuntimeError(f"WATCH {path}: HTTP {resp.status}: {resp.read()[:300]!r}")
            buffer = b""
            for chunk in resp.stream(amt=None, decode_content=True):
                arrival = time.monotonic()
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        yield arrival, json.loads(line)
        finally:
            resp.release_conn()

    def follow(self, path: str, *, log: Callable[[str], None], **query: Any) -> Iterator[tuple[float, str, Any]]:
        """List `path`, then watch it from that listing, for ever: ("LISTED", the items) after each listing, then
        (arrival, type, object) for each event but BOOKMARKs. An ERROR event (e.g. 410 Gone) or a broken watch
        lists again (said through `log`)."""
        rv: str | None = None
        while True:
            try:
                if rv is None:
                    listing = self.get(path, **query)
                    rv = listing["metadata"]["resourceVersion"]
                    yield time.monotonic(), "LISTED", listing["items"]
                for arrival, event in self.watch(path, rv, **query):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        rv = None
                        break
                    rv = obj["metadata"]["resourceVersion"]
                    if kind != "BOOKMARK":
                        yield arrival, kind, obj
            except Exception as exc:  # a broken watch is re-established from a fresh list
                log(f"watch of {path} interrupted ({exc}); listing again")
                rv = None
                time.sleep(0.5)
