#!/bin/sh
# beacon's Debian base for images (hack/kind/base-images.sh): package installs during an image build start no
# services (systemd starts the node's services when the node boots).
exit 101
