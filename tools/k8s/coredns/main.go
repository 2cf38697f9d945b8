// Command coredns is CoreDNS with only the plugins beacon's local control plane uses. Importing a handful of
// plugin packages instead of all of them builds several times faster than the full binary, with the same
// behaviour for these plugins; a Corefile for this binary may use nothing else.
package main

import (
	_ "github.com/coredns/coredns/core/dnsserver" // the server type the plugins below register into
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
