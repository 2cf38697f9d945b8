// Command etcd is etcd's own server entry point, built from its Go module so the local control plane needs no
// prebuilt binary download (Debian's etcd 3.4 is too old for current kube-apiservers).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
