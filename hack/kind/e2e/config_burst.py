"""Quick edits of a ConfigEntry (hack/kind-e2e.sh, scenario "reload").

Sets spec.data[KEY] to each VALUE in turn with one merge patch per value, back to back from one process (a
kubectl process per edit would space them by its own start-up time), and prints how long the burst took and the
largest gap between two edits, so the log shows that the burst fitted in beacon's reload debounce window.
"""

from __future__ import annotations

import argparse
import itertools
import time

from kubeapi import Kube


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--kubeconfig", required=True)
    p.add_argument("--context")
    p.add_argument("--namespace", required=True)
    p.add_argument("--name", required=True, help="the ConfigEntry")
    p.add_argument("--key", required=True)
    p.add_argument("values", nargs="+")
    args = p.parse_args()

    kube = Kube(args.kubeconfig, args.context)
    path = f"/apis/beacon.dev/v1alpha1/namespaces/{args.namespace}/configentries/{args.name}"
    stamps = []
    for value in args.values:
        kube.merge_patch(path, {"spec": {"data": {args.key: value}}})
        stamps.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    print(
        f"[config-burst] {len(args.values)} edits of {args.name} ({args.key}={args.values[0]}..{args.values[-1]}) "
        f"in {stamps[-1] - stamps[0]:.2f}s, largest gap {max(gaps, default=0.0):.2f}s",
        flush=True,
    )


if __name__ == "__main__":
    main()
